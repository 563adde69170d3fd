"""``glmkit serve --tp 2`` (2 gloo processes, the trained tiny GLM-4) against a one-process ``glmkit serve
--fast-decode``, both driven by the official openai client: the same text, plain and streamed, 4 concurrent clients,
a client that hangs up, and a shutdown that leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from glmkit.engine import Engine
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.parallel import free_port
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


def start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmkit.cli", "serve", "--model", str(TRAINED_TINY_DIR), "--port", str(port),
           "--max-batch-size", "4", "--max-context", "256", "--dtype", "float32", *flags]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, deadline_s: float = 120) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} did not answer /health within {deadline_s} s")


def stop_all(proc: subprocess.Popen) -> None:
    """Teardown after a failed test: kill what this test started, by pid."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def servers():
    (tp, tp_url), (one, one_url) = start("--tp", "2"), start("--fast-decode")
    try:
        wait_ready(tp, tp_url)
        wait_ready(one, one_url)
        yield tp, tp_url, one_url, one
    finally:
        stop_all(tp)
        stop_all(one)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(base: str, content: str = QUESTIONS[0], **kw) -> str:
    r = client(base).chat.completions.create(model="glm-4", messages=[{"role": "user", "content": content}],
                                             temperature=0, max_tokens=40, **kw)
    return r.choices[0].message.content


def test_plain_and_streamed_replies_match_one_process(servers):
    _, tp, one, _ = servers
    want = ask(one)
    assert "40" in want and ask(tp) == want
    chunks = list(client(tp).chat.completions.create(
        model="glm-4", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=40,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want and len(chunks) > 3


def test_four_concurrent_clients_get_one_process_answers(servers):
    _, tp, one, _ = servers
    want = [ask(one, q) for q in QUESTIONS]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: ask(tp, q), QUESTIONS))
    assert got == want
    assert httpx.get(tp + "/health").json()["max_batch_size"] == 4


def test_a_client_that_hangs_up_mid_stream_is_cancelled_and_the_server_answers_on(servers):
    _, tp, one, _ = servers
    no_end = {str(t): -100 for t in (832, 839, 841)}  # the tiny model's end tokens: it talks until max_tokens
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", tp + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": QUESTIONS[1]}], "stream": True, "max_tokens": 230,
                  "temperature": 0, "logit_bias": no_end}) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # real text arrived: hang up
    deadline = time.time() + 60
    while 'finished_reason="cancelled"' not in httpx.get(tp + "/metrics").text:
        assert time.time() < deadline, "the hung-up request was not cancelled"
        time.sleep(0.1)
    assert ask(tp) == ask(one)


def test_sigterm_to_the_launcher_stops_every_process(servers):
    launcher, _, _, one = servers
    one.send_signal(signal.SIGTERM)
    assert one.wait(60) == 0  # (one process: uvicorn shuts down, then glmkit serve exits 0)
    children = psutil.Process(launcher.pid).children(recursive=True)
    assert len(children) == 3  # torchrun and its 2 workers
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(60) == 0  # rank 0 shut down and released rank 1: nobody failed
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    out = launcher.stdout.read()
    assert out.count("glmkit serve: glm-4") == 1 and "tensor parallel x2" in out  # only rank 0 speaks


@pytest.mark.parametrize("flags, needle", [(["--tp", "4"], "2 KV heads"),
                                            (["--tp", "2", "--device-map", "auto"], "not both"),
                                            (["--tp", "2", "--quantization", "nf4"], "--quantization")])
def test_tp_refuses_four_ranks_and_other_placements(flags, needle, capsys):
    from glmkit.cli import main

    assert main(["serve", "--model", str(TRAINED_TINY_DIR), *flags]) == 2  # refused before any process starts
    assert needle in capsys.readouterr().err
