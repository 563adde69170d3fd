"""The API server on loopback, driven by the official openai client and by raw HTTP for malformed input."""

import json
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
    engine = Engine(model, load_tokenizer(TRAINED_TINY_DIR), max_batch_size=16, max_context=2048)
    srv = ServerThread(create_app(engine, api_key=KEY)).start()  # the default names: glm-4, glm-4-9b-chat
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
    assert [m.id for m in client.models.list()] == ["glm-4", "glm-4-9b-chat"]
    assert client.models.retrieve("glm-4").id == "glm-4"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-5")
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
    ({"messages": [{"role": "user", "content": "word " * 2500}], "max_tokens": 10}, 400, "exceeds the context"),
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
    r = httpx.post(server[0].url + "/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
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


# --- OpenAI compatibility (issue 23) -------------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def sse(response):
    """The JSON events of a server-sent-events response, without the final [DONE]."""
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_official_glm4_demo_calls_work_unchanged(server):
    # THUDM/GLM-4 basic_demo/openai_api_request.py: simple_chat and function_chat, streaming and not, as written there
    # (only base_url and api_key are this server's). presence_penalty is accepted; the engine applies it (issue 20).
    client = openai.OpenAI(api_key=KEY, base_url=server[0].url + "/", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": "请在你输出的时候都带上“喵喵喵”三个字，放在开头。"},
                {"role": "user", "content": "你好，你是谁"}]
    for use_stream in (False, True):
        response = client.chat.completions.create(model="glm-4", messages=messages, stream=use_stream, max_tokens=256,
                                                  temperature=0.4, presence_penalty=1.2, top_p=0.8)
        if use_stream:
            chunks = list(response)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length") and {c.model for c in chunks} == {"glm-4"}
        else:
            assert response.model == "glm-4" and response.choices[0].message.content
    tools = [{"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"],
                       "description": "The temperature unit to use. Infer this from the users location."}},
            "required": ["location", "format"]}}}]
    for use_stream in (False, True):
        response = client.chat.completions.create(
            model="glm-4", messages=[{"role": "user", "content": "What's the Celsius temperature in San Francisco?"}],
            tools=tools, stream=use_stream, max_tokens=256, temperature=0.9, presence_penalty=1.2, top_p=0.1,
            tool_choice="auto")
        final = list(response)[-1].choices[0] if use_stream else response.choices[0]
        assert final.finish_reason in ("stop", "length", "tool_calls")


def test_n_null_and_the_usage_chunk_with_created_and_model(server, client):
    r = httpx.post(server[0].url + "/chat/completions", json={"model": "glm-4", "messages": HI, "n": None,
                                                              "max_tokens": 4}, headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] == "glm-4"
    chunks = list(ask(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8 and last.model == "glm-4-9b-chat"
    assert last.created == chunks[0].created > 0 and last.id == chunks[0].id


def test_tool_replies_stream_text_as_it_comes(client):
    # The tiny model answers this in words: with tools offered the words still arrive piece by piece.
    kw = dict(model="glm-4", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
              max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0]
    assert plain.message.tool_calls is None and plain.message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == plain.message.content and len(pieces) > 3


def test_streamed_tool_call_arrives_whole_when_complete(client):
    chunks = list(client.chat.completions.create(
        model="glm-4", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=12, temperature=0, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_time" and calls[0][0].index == 0
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # no call text leaked as content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_required_with_several_tools_lets_the_model_pick(client):
    for stream in (False, True):
        r = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=[WEATHER, TIME], tool_choice="required", max_tokens=12,
                                           temperature=0, stream=stream)
        if stream:
            chunks = list(r)
            call = next(c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls)
            reason = chunks[-1].choices[0].finish_reason
        else:
            call, reason = r.choices[0].message.tool_calls[0], r.choices[0].finish_reason
        assert call.function.name in ("get_weather", "get_time") and reason == "tool_calls"


def test_tool_call_splitter_holds_only_what_could_be_a_call():
    from glmkit.server import ToolCallSplitter

    call = 'get_weather\n{"city": "Paris"}'
    s = ToolCallSplitter({"get_weather", "get_time"})
    assert [s.feed(c) for c in call] == [""] * len(call) and s.call()["function"]["arguments"] == '{"city": "Paris"}'
    s = ToolCallSplitter({"get_weather"})
    out = [s.feed(c) for c in "get going\nnow"]
    assert "".join(out) == "get going\nnow" and out[:4] == ["", "", "", ""] and s.call() is None and s.rest() == ""
    s = ToolCallSplitter({"get_weather"})
    assert s.feed("get_w") == "" and s.call() is None and s.rest() == "get_w"  # ended mid-name: it was text
    s = ToolCallSplitter({"get_weather"}, prefix="get_weather\n")  # forced: all of it is the arguments
    assert s.feed('{"city"') == "" and s.call()["function"]["name"] == "get_weather"


def test_legacy_completions(client, server):
    plain = client.completions.create(model="glm-4", prompt="How many layers", max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and plain.model == "glm-4" and choice.text
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    streamed = list(client.completions.create(model="glm-4", prompt="How many layers", max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].usage.total_tokens == plain.usage.total_tokens
    echoed = client.completions.create(model="glm-4", prompt="How many layers", max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == "How many layers" + choice.text
    default = client.completions.create(model="glm-4", prompt="GPU memory", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default for /v1/completions
    ids = server[1].tokenizer("How many layers").input_ids
    by_ids = client.completions.create(model="glm-4", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == choice.text


def test_unknown_paths_and_wrong_methods_answer_in_openai_format(server):
    base = server[0].url
    r = httpx.get(base + "/embeddings", headers=AUTH)
    assert r.status_code == 404 and "/v1/embeddings" in r.json()["error"]["message"]
    r = httpx.get(base + "/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "use POST" in r.json()["error"]["message"] and r.headers["allow"] == "POST"
    r = httpx.delete(base.replace("/v1", "/health"))
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(base + "/models/gpt-5", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


TOOLS = [WEATHER]


@pytest.mark.parametrize("raw, status, needle", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": "x", "stream": true}', 400, "stream_options"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}', 400,
     "only allowed with"),
    (json.dumps({"messages": HI, "tools": TOOLS, "tool_choice": {"type": "function", "function": "f"}}).encode(), 400,
     "tool_choice must look like"),
    (json.dumps({"messages": HI, "tool_choice": "required"}).encode(), 400, "at least one tool"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (json.dumps({"messages": HI, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode(),
     400, "at most 32 levels"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "'temperature'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, "'top_p'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400, "'temperature'"),
    (json.dumps({"messages": HI, "seed": 2**70}).encode(), 400, "'seed'"),
    (json.dumps({"messages": HI, "stream": "false"}).encode(), 400, "'stream' must be true or false"),
    (json.dumps({"messages": HI, "response_format": {"type": "json_object"}}).encode(), 400, "does not constrain"),
    (json.dumps({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}).encode(),
     400, "does not constrain"),
    (json.dumps({"messages": HI, "response_format": "json"}).encode(), 400, "'response_format' must be"),
    (json.dumps({"model": "glm-4"}).encode(), 400, "'messages'"),
])
def test_bad_input_that_used_to_500_gets_a_clear_4xx(server, client, raw, status, needle):
    r = httpx.post(server[0].url + "/chat/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, needle", [
    ({"prompt": ""}, "'prompt' must be"),
    ({"prompt": ["a", "b"]}, "'prompt' must be"),
    ({"prompt": [1, 10**9]}, "outside this model's vocabulary"),
    ({"prompt": "hi", "suffix": "end"}, "'suffix' is not supported"),
    ({"prompt": "hi", "best_of": 3}, "'best_of' is not supported"),
    ({"prompt": "hi", "echo": "yes"}, "'echo' must be true or false"),
    ({"prompt": "hi", "model": "text-davinci-003"}, "does not exist"),
])
def test_bad_completions_input(server, body, needle):
    r = httpx.post(server[0].url + "/completions", json=body, headers=AUTH)
    assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], r.text


def test_body_limits_and_content_type(server, client):
    url = server[0].url + "/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}).encode()
    r = httpx.post(url, content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "4 MiB" in r.json()["error"]["message"]
    r = httpx.post(url, content=json.dumps({"messages": HI}).encode(), headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert "40" in ask(client, max_tokens=20).choices[0].message.content  # still serving


def test_openai_client_sees_4xx_as_its_own_errors(client):
    assert ask(client, max_tokens=4, n=None).choices[0].message.content is not None  # the client sends "n": null
    with pytest.raises(openai.BadRequestError, match="does not constrain decoding"):
        ask(client, max_tokens=4, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="'seed'"):
        ask(client, max_tokens=4, seed=2**70)
    with pytest.raises(openai.NotFoundError, match="serves 'glm-4', 'glm-4-9b-chat'"):
        client.chat.completions.create(model="gpt-5", messages=HI)
    with pytest.raises(openai.BadRequestError, match="'suffix' is not supported"):
        client.completions.create(model="glm-4", prompt="hi", suffix="end")


def test_default_batch_size_plans_the_fast_path_when_serving_with_it(monkeypatch):
    import glmkit.server
    from glmkit.models import glm4_9b_chat_config
    from glmkit.monitor import DeviceMemory

    monkeypatch.setattr(glmkit.server, "gpu_memory", lambda: [DeviceMemory("cuda:0", "a 20 GiB card", 20 * 2**30, 0, None)])
    cfg = glm4_9b_chat_config()
    # the fast path's extra memory (fused q/k/v copies, fp32 logits) leaves room for batch 1 where plain fits 2
    assert glmkit.server.default_batch_size(cfg, 4096) == 2
    assert glmkit.server.default_batch_size(cfg, 4096, fast_decode=True) == 1
