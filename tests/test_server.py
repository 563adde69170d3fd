"""The API server on loopback, driven by the official openai client and by raw HTTP for malformed input."""

import threading
import time

import httpx
import openai
import pytest
import torch

from glmkit.engine import Engine
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.server import ServerThread, create_app, parse_tool_call

KEY = "test-key"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def server():
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    engine = Engine(model, load_tokenizer(TRAINED_TINY_DIR), max_batch_size=16, max_context=512)
    srv = ServerThread(create_app(engine, "glm-4-9b-chat", api_key=KEY)).start()
    yield srv, engine
    srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key=KEY, max_retries=0, timeout=60)


def ask(client, content="How many layers does GLM-4-9B-Chat have?", **kw):
    return client.chat.completions.create(model="glm-4-9b-chat", messages=[{"role": "user", "content": content}],
                                          temperature=kw.pop("temperature", 0), **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["glm-4-9b-chat"]
    health = httpx.get(server[0].url.replace("/v1", "/health")).json()
    assert health["status"] == "ok" and health["max_batch_size"] == 16


def test_plain_completion_with_usage(client):
    r = ask(client, max_tokens=40)
    assert "40" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_gives_finish_reason_length(client):
    r = ask(client, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_streaming_matches_plain(client):
    plain = ask(client, max_tokens=40).choices[0].message.content
    stream = ask(client, max_tokens=40, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_and_seeded_sampling(client):
    r = ask(client, max_tokens=40, stop=["decoder"])
    assert r.choices[0].message.content.endswith("40 ") and r.choices[0].finish_reason == "stop"
    a = ask(client, "Tell me about GPUs.", max_tokens=20, temperature=1.2, seed=7).choices[0].message.content
    b = ask(client, "Tell me about GPUs.", max_tokens=20, temperature=1.2, seed=7).choices[0].message.content
    assert a == b


def test_forced_tool_call_round_trip(client):
    r = client.chat.completions.create(model="glm-4-9b-chat", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, str) and call.id.startswith("call_")
    follow = client.chat.completions.create(model="glm-4-9b-chat", messages=[
        {"role": "user", "content": "Weather in Paris?"}, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}], tools=[WEATHER], max_tokens=8, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_glm4_tool_call_format_is_parsed():
    call = parse_tool_call('get_weather\n{"city": "Paris"}', {"get_weather"})
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_call('other\n{"a": 1}', {"get_weather"}) is None


def test_auth(server):
    bad = openai.OpenAI(base_url=server[0].url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server[0].url + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role 'wizard'"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "positive integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "positive integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "beyond this server's context"),
    ({"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 10}, 400, "exceeds the context"),
    ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 10000}, 400, "n=10000"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "'temperature'"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"messages": "hi"}, 400, "non-empty list"),
])
def test_bad_input_gets_openai_style_errors(server, body, status, needle):
    r = httpx.post(server[0].url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_json(server, client):
    r = httpx.post(server[0].url + "/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert "40" in ask(client, max_tokens=20).choices[0].message.content  # still serving


def test_client_disconnect_stops_its_generation(tmp_path):
    # A random-weight GLM, greedy: it rambles without an end token, so only a disconnect can stop it early; 24 layers
    # make 1500 tokens take many seconds, far longer than noticing the hang-up, even on a loaded machine.
    from glmkit.models import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "slow", seed=3, num_hidden_layers=24)
    engine = Engine(load_model(path, device_map="cpu"), load_tokenizer(path), max_context=2048)
    srv = ServerThread(create_app(engine)).start()
    try:
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", srv.url + "/chat/completions",
                json={"messages": [{"role": "user", "content": "Tell me about GPUs."}], "stream": True,
                      "max_tokens": 1500, "temperature": 0}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # got real text: hang up
        start = time.time()
        while time.time() - start < 60 and not engine.finished:
            time.sleep(0.05)
        last = engine.finished[-1]
        assert last.finish_reason == "cancelled" and len(last.tokens) < 1500  # stopped, not generated to the end
    finally:
        srv.stop()
        engine.close()


def test_sixteen_concurrent_clients_are_batched_and_all_answered(server, client):
    engine = server[1]
    before = engine.batches_run
    questions = ["How many layers does GLM-4-9B-Chat have?", "What is tensor parallelism?",
                 "What does 4-bit quantization save?", "What is a device map?"] * 4
    expected = {q: ask(client, q, max_tokens=40).choices[0].message.content for q in set(questions)}
    answers = [None] * 16

    def worker(i):
        answers[i] = ask(client, questions[i], max_tokens=40).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [expected[q] for q in questions]  # nothing lost, nothing mixed up
    assert engine.batches_run - before < 16 and engine.largest_batch > 1  # batched, not one by one


def test_a_failing_generation_errors_that_request_and_the_engine_keeps_serving(server, client):
    engine = server[1]
    bad = engine.submit([10**7], max_tokens=4).wait(30)  # an id far outside the vocabulary: it fails alone
    assert bad.finish_reason == "error" and "outside the vocabulary" in bad.error
    assert "40" in ask(client, max_tokens=20).choices[0].message.content  # the next request is served


def test_fast_decode_engine_answers_like_the_plain_loop():
    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    tok = load_tokenizer(TRAINED_TINY_DIR)
    plain, fast = Engine(model, tok, max_context=512), Engine(model, tok, max_context=512, fast_decode=True)
    try:
        layers = plain.encode([{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}])
        split = plain.encode([{"role": "user", "content": "How do I split the model over two GPUs?"}])
        for ids, kw in [(layers, {"max_tokens": 40}), (split, {"max_tokens": 12}),
                        (layers, {"max_tokens": 40, "stop": ["decoder"]})]:  # stop token, length, stop string
            a, b = plain.submit(ids, **kw).wait(60), fast.submit(ids, **kw).wait(60)
            assert (b.text, b.tokens, b.finish_reason) == (a.text, a.tokens, a.finish_reason)
        seeded = [fast.submit(split, max_tokens=20, temperature=1.2, seed=7).wait(60).text for _ in range(2)]
        assert seeded[0] == seeded[1]
        assert fast.fast_requests == 5 and plain.fast_requests == 0
        # requests that arrive together: prompts of different lengths in one fast batch, each at its own position
        jobs = [(layers, {"max_tokens": 40}), (split, {"max_tokens": 7}), (layers, {"max_tokens": 40, "stop": ["decoder"]})]
        alone = [plain.submit(ids, **kw).wait(60) for ids, kw in jobs]
        fast.gather_s = 1.0  # wait for company
        together = [fast.submit(ids, **kw) for ids, kw in jobs]
        for a, b in zip(alone, (r.wait(60) for r in together)):
            assert (b.text, b.tokens, b.finish_reason) == (a.text, a.tokens, a.finish_reason)
        assert fast.largest_batch == 3 and fast.fast_requests == 8
    finally:
        plain.close()
        fast.close()
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, vocab_size=128))
    with pytest.raises(TypeError, match="GLM"):  # said when the engine is made, not at the first request
        Engine(llama, tok, fast_decode=True)
