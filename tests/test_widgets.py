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
