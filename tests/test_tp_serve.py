"""``glmkit serve --tp 2`` (2 gloo processes, the trained tiny GLM-4) against a one-process ``glmkit serve
--fast-decode``, both driven by the official openai client: the same text, plain and streamed, 4 concurrent clients,
a client that hangs up, and a shutdown that leaves no process behind."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from glmkit.bench import ServeProcess
from glmkit.engine import Engine
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.tp_decode import TPDecoder

QUESTIONS = ["How many layers does GLM-4-9B-Chat have?", "What is tensor parallelism?",
             "What does 4-bit quantization save?", "What is a device map?"]


def test_an_injected_decoder_serves_like_the_fast_path_without_the_models_forward():
    import torch

    model = load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu")
    tokenizer = load_tokenizer(TRAINED_TINY_DIR)
    fast = Engine(model, tokenizer, max_batch_size=2, max_context=96, fast_decode=True)
    try:
        want = [fast.submit(tokenizer(q).input_ids, max_tokens=12).wait().tokens for q in QUESTIONS]
    finally:
        fast.close()
    model.forward = None  # an injected decoder brings its own forward: the model only lends config and end tokens
    decoder = TPDecoder(model, 97, 2)
    engine = Engine(model, tokenizer, max_batch_size=2, max_context=96, decoder=decoder)
    try:
        reqs = [engine.submit(tokenizer(q).input_ids, max_tokens=12) for q in QUESTIONS]  # 4 requests in 2 slots
        assert [r.wait().tokens for r in reqs] == want and not any(r.error for r in reqs)
        assert engine.runner.decoder is decoder and decoder.ready  # it ran them
    finally:
        engine.close()
    with pytest.raises(ValueError, match="batch_size=4, max_len=97"):
        Engine(model, tokenizer, max_batch_size=4, max_context=96, decoder=TPDecoder(model, 97, 2))


@pytest.fixture(scope="module")
def servers():
    flags = ("--max-batch-size", "4", "--max-context", "256", "--dtype", "float32")
    tp = ServeProcess(TRAINED_TINY_DIR, *flags, "--tp", "2", env={"OMP_NUM_THREADS": "1"})
    one = ServeProcess(TRAINED_TINY_DIR, *flags, "--fast-decode", env={"OMP_NUM_THREADS": "1"})
    try:
        tp.launch()
        one.launch()  # they load side by side
        tp.wait_ready()
        one.wait_ready()
        yield tp, one
    finally:  # teardown after a failed test: kill what this test started, by pid
        tp.close()
        one.close()


def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def ask(server: ServeProcess, content: str = QUESTIONS[0], **kw) -> str:
    r = client(server).chat.completions.create(model="glm-4", messages=[{"role": "user", "content": content}],
                                             temperature=0, max_tokens=40, **kw)
    return r.choices[0].message.content


def test_plain_and_streamed_replies_match_one_process(servers):
    tp, one = servers
    want = ask(one)
    assert "40" in want and ask(tp) == want
    chunks = list(client(tp).chat.completions.create(
        model="glm-4", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=40,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want and len(chunks) > 3


def test_four_concurrent_clients_get_one_process_answers(servers):
    tp, one = servers
    want = [ask(one, q) for q in QUESTIONS]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: ask(tp, q), QUESTIONS))
    assert got == want
    assert httpx.get(tp.root + "/health").json()["max_batch_size"] == 4


def test_a_client_that_hangs_up_mid_stream_is_cancelled_and_the_server_answers_on(servers):
    tp, one = servers
    no_end = {str(t): -100 for t in (832, 839, 841)}  # the tiny model's end tokens: it talks until max_tokens
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", tp.url + "/chat/completions",
            json={"messages": [{"role": "user", "content": QUESTIONS[1]}], "stream": True, "max_tokens": 230,
                  "temperature": 0, "logit_bias": no_end}) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # real text arrived: hang up
    deadline = time.time() + 60
    while 'finished_reason="cancelled"' not in httpx.get(tp.root + "/metrics").text:
        assert time.time() < deadline, "the hung-up request was not cancelled"
        time.sleep(0.1)
    assert ask(tp) == ask(one)


def test_sigterm_to_the_launcher_stops_every_process(servers):
    launcher, one = servers
    assert one.stop()["exit_code"] == 0  # (one process: uvicorn shuts down, then glmkit serve exits 0)
    stopped = launcher.stop()
    assert stopped["processes"] == 4  # glmkit serve, torchrun and its 2 workers
    assert stopped["exit_code"] == 0  # rank 0 shut down and released rank 1: nobody failed
    assert stopped["left_after_30s"] == 0
    out = launcher.log()
    assert out.count("glmkit serve: glm-4") == 1 and "tensor parallel x2" in out  # only rank 0 speaks


@pytest.mark.parametrize("flags, needle", [(["--tp", "4"], "2 KV heads"),
                                            (["--tp", "2", "--device-map", "auto"], "not both"),
                                            (["--tp", "2", "--quantization", "nf4"], "--quantization")])
def test_tp_refuses_four_ranks_and_other_placements(flags, needle, capsys):
    from glmkit.cli import main

    assert main(["serve", "--model", str(TRAINED_TINY_DIR), *flags]) == 2  # refused before any process starts
    assert needle in capsys.readouterr().err
