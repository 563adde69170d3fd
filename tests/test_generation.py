import threading

import pytest
import torch
from transformers import DynamicCache

from glmkit.generation import (
    cache_argument,
    chat,
    chunked_prefill,
    clean_reply,
    encode_chat,
    gqa_attention,
    preallocated_cache,
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


def test_gqa_attention_is_lower_right_causal_attention_over_the_kv_heads():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((8, 5), (2, 12), (2, 12)))
    module = torch.nn.Module()
    out, _ = gqa_attention(module, q, k, v, None, scaling=0.25)
    # reference: K/V copied to every query head, explicit mask: chunk position i sees keys up to 12 - 5 + i
    mask = torch.arange(12)[None, :] <= torch.arange(5)[:, None] + 7
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                           attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    with pytest.raises(ValueError, match="unpadded"):
        gqa_attention(module, q, k, v, torch.ones(2, 1, 5, 12, dtype=torch.bool))


def test_chunked_prefill_preallocates_and_reports_a_full_cache(model_tok):
    model, _ = model_tok
    ids = torch.randint(0, 800, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = chunked_prefill(model, ids, chunk=8, max_new_tokens=2)
    grown = chunked_prefill(model, ids, chunk=8, cache=DynamicCache(config=model.config))
    assert cache.get_seq_length() == grown.get_seq_length() == 29
    torch.testing.assert_close(cache.layers[0].keys, grown.layers[0].keys)
    assert cache.layers[0]._k.shape[2] == 32  # 30 prompt tokens + 2 new, allocated once
    out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == 32
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, **{cache_argument(model): chunked_prefill(model, ids, 8, max_new_tokens=2)},
                       max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert model.config._attn_implementation == "sdpa"


def test_preallocated_cache_rejects_overflow():
    from glmkit.models import tiny_glm_config

    cache = preallocated_cache(tiny_glm_config(), capacity=4)
    cache.update(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64), 0)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        cache.update(torch.zeros(1, 2, 2, 64), torch.zeros(1, 2, 2, 64), 0)
