import pytest
import torch

from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.widgets import chat_widget


@pytest.fixture(scope="module")
def model_tok():
    return load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu"), load_tokenizer(TRAINED_TINY_DIR)


def test_chat_widget_streams_a_reply_into_history(model_tok):
    chat = chat_widget(*model_tok)
    seen = []
    chat.log.observe(lambda change: seen.append(change["new"]), names="value")
    chat.send_message("How many layers does GLM-4-9B-Chat have?", wait=True)
    assert chat.history[-1]["role"] == "assistant" and "40" in chat.history[-1]["content"]
    partials = [v for v in seen if "▌" in v]
    assert len(partials) >= 3  # the reply grew piece by piece
    assert "tok/s" in chat.status.value and "cpu" in chat.status.value


def test_multi_turn_goes_through_the_template(model_tok):
    chat = chat_widget(*model_tok, system_prompt="Answer briefly.")
    chat.send_message("What is a device map?", wait=True)
    chat.send_message("What is tensor parallelism?", wait=True)
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant", "user", "assistant"]
    text = model_tok[1].apply_chat_template(chat.messages()[:-1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\nWhat is a device map?<|assistant|>\n")


def test_stop_button_really_stops(model_tok):
    full = chat_widget(*model_tok)
    full.send_message("How do I split the model over two GPUs?", wait=True)
    n_full = len(model_tok[1](full.history[-1]["content"]).input_ids)
    chat = chat_widget(*model_tok)
    chat.send_message("How do I split the model over two GPUs?")
    chat.stop()  # what the stop button does, while the reply is being generated
    chat._thread.join(30)
    assert not chat._thread.is_alive() and "(stopped)" in chat.status.value
    n_stopped = len(model_tok[1](chat.history[-1]["content"]).input_ids)
    assert n_full > 10 and n_stopped < n_full / 2


def test_clear(model_tok):
    chat = chat_widget(*model_tok)
    chat.send_message("hello", wait=True)
    chat.clear()
    assert chat.history == [] and "no messages" in chat.log.value


def test_chat_widget_on_the_fast_path_gives_the_plain_engines_greedy_tokens(model_tok):
    from glmkit.engine import Engine

    chat = chat_widget(*model_tok, fast_decode=True)
    chat.send_message("How many layers does GLM-4-9B-Chat have?", wait=True)
    engine = chat.engine()
    try:
        assert engine.fast_decode and engine.max_batch_size == 1 and engine.fast_requests == 1  # FastDecoder answered
        reply = engine.finished[-1]
        assert chat.history[-1] == {"role": "assistant", "content": reply.text} and "40" in reply.text
        plain = Engine(*model_tok, max_batch_size=1)
        try:
            want = plain.submit(plain.encode(chat.messages()[:-1]), max_tokens=chat.max_tokens.value,
                                temperature=0.0).wait(60)
        finally:
            plain.close()
        assert plain.fast_requests == 0 and reply.tokens == want.tokens and len(want.tokens) > 5
        assert "tok/s" in chat.status.value
    finally:
        engine.close()


def test_chat_widget_fast_decode_refuses_what_the_fast_path_cannot_run(model_tok):
    from glmkit.engine import Engine

    engine = Engine(*model_tok, max_batch_size=1)
    try:
        with pytest.raises(ValueError, match="pass fast_decode=True to the Engine you give"):
            chat_widget(*model_tok, engine=engine, fast_decode=True)
        assert chat_widget(*model_tok, engine=engine).engine() is engine
    finally:
        engine.close()
    pytest.importorskip("bitsandbytes")
    from glmkit.quantization import load_precision

    int8 = load_precision(TRAINED_TINY_DIR, "int8", device_map="cpu")
    with pytest.raises(ValueError, match="does not run int8"):  # said when the widget is made, not at the first message
        chat_widget(int8, model_tok[1], fast_decode=True)
