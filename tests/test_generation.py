import threading

import pytest
import torch

from glmkit.generation import (
    cache_argument,
    chat,
    chunked_prefill,
    clean_reply,
    encode_chat,
    sampling_kwargs,
    stream_chat,
)
from glmkit.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_tok(tiny_path):
    return load_model(tiny_path, device_map="cpu"), load_tokenizer(tiny_path)


def test_chat_greedy_is_deterministic_and_counts_tokens(model_tok):
    model, tok = model_tok
    msgs = [{"role": "user", "content": "How many KV heads?"}]
    a = chat(model, tok, msgs, max_new_tokens=8)
    b = chat(model, tok, msgs, max_new_tokens=8)
    assert a.text == b.text and a.new_tokens == b.new_tokens
    assert a.prompt_tokens == encode_chat(tok, msgs)["input_ids"].shape[1]
    assert a.finish_reason in ("stop", "length") and 0 < a.new_tokens <= 8


def test_stream_chat_yields_the_same_text_as_chat(model_tok):
    model, tok = model_tok
    msgs = [{"role": "user", "content": "hello"}]
    assert "".join(stream_chat(model, tok, msgs, max_new_tokens=10)) == chat(model, tok, msgs, max_new_tokens=10).text


def test_stream_chat_stops_when_asked(model_tok):
    model, tok = model_tok
    stop = threading.Event()
    stop.set()
    msgs = [{"role": "user", "content": "hi"}]
    stopped = "".join(stream_chat(model, tok, msgs, max_new_tokens=50, stop_event=stop))
    full = chat(model, tok, msgs, max_new_tokens=50)
    assert full.new_tokens == 50  # the random tiny model never says an end token this soon
    assert len(stopped) < len(full.text) and full.text.startswith(stopped)


def test_chunked_prefill_gives_the_same_logits_and_tokens(model_tok):
    model, _ = model_tok
    ids = torch.randint(0, 800, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).logits[:, -1]
        cache = chunked_prefill(model, ids, chunk=16)
        last = model(ids[:, -1:], **{cache_argument(model): cache}).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)
    plain = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    chunked = model.generate(ids, **{cache_argument(model): chunked_prefill(model, ids, 16)}, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False)
    assert torch.equal(plain, chunked)


def test_chat_with_prefill_chunk_matches(model_tok):
    model, tok = model_tok
    msgs = [{"role": "user", "content": "Why does the auto device map run out of memory on two cards?"}]
    assert chat(model, tok, msgs, max_new_tokens=6, prefill_chunk=8).text == chat(model, tok, msgs, max_new_tokens=6).text


def test_bad_sampling_and_chunk():
    with pytest.raises(ValueError, match="top_p"):
        sampling_kwargs(0.5, 0)
    with pytest.raises(ValueError, match="at least 1"):
        chunked_prefill(None, torch.ones(1, 4, dtype=torch.long), 0)
    assert clean_reply("\nHi") == "Hi" and clean_reply("Hi") == "Hi"
