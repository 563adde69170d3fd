"""The engine on the CPU with tiny GLMs: continuous batching, failure isolation, sampling settings, metrics, leaks.

Order of events is asserted (``Engine.events``), never wall time.
"""

import random
import threading
import time
from collections import deque

import httpx
import pytest
import torch

from glmkit.engine import Engine, GenerationRequest
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR, build_tiny_checkpoint
from glmkit.sampling import SamplingRow, sample, uniform_noise

QUESTIONS = ["How many layers does GLM-4-9B-Chat have?", "How do I split the model over two GPUs?",
             "What is a device map?"]


@pytest.fixture(scope="module")
def trained():
    return load_model(TRAINED_TINY_DIR, dtype=torch.float32, device_map="cpu"), load_tokenizer(TRAINED_TINY_DIR)


@pytest.fixture(scope="module")
def rambler(tmp_path_factory):
    """A random-weight tiny GLM: greedy, it rambles without an end token (long generations on demand)."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("rambler"), seed=3)
    return load_model(path, device_map="cpu"), load_tokenizer(path)


@pytest.fixture(scope="module")
def fast(trained):
    engine = Engine(*trained, max_batch_size=8, max_context=512, fast_decode=True)
    yield engine
    engine.close()


def prompt(engine, i=0):
    return engine.encode([{"role": "user", "content": QUESTIONS[i]}])


def reference(model, ids, n):
    """Greedy tokens of transformers' own generate() (end token dropped)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    eos = set(model.generation_config.eos_token_id)
    return out[:next((i for i, t in enumerate(out) if t in eos), len(out))]


def test_greedy_tokens_match_generate_alone_and_concurrent(trained, fast):
    model, _ = trained
    jobs = [(prompt(fast, i), n) for i, n in enumerate((40, 9, 30))]
    expected = [reference(model, ids, n) for ids, n in jobs]
    assert [fast.submit(ids, max_tokens=n).wait(60).tokens for ids, n in jobs] == expected
    together = [fast.submit(ids, max_tokens=n) for ids, n in jobs]
    assert [r.wait(60).tokens for r in together] == expected
    plain = Engine(*trained, max_context=512)
    riding = Engine(*trained, max_context=512, fast_decode=True, ride_from_batch=0)  # prompts through decode steps
    try:
        assert [r.wait(60).tokens for r in [plain.submit(ids, max_tokens=n) for ids, n in jobs]] == expected
        assert [r.wait(60).tokens for r in [riding.submit(ids, max_tokens=n) for ids, n in jobs]] == expected
        assert riding.steps > sum(len(ids) for ids, _ in jobs) // 3  # they did ride: a step per prompt token
    finally:
        plain.close()
        riding.close()


def test_each_step_is_queued_before_the_host_reads_the_tokens_of_the_step_before(trained):
    """The fast path's overlap: a decode step takes the previous step's token on the device (an ``Inflight`` the host
    has not read yet), and the tokens stay those of generate()."""
    engine = Engine(*trained, max_batch_size=2, max_context=512, fast_decode=True)
    real, fed = engine.runner.decode, []

    def spy(running, decoding, riding, inflight):
        fed.append([inflight is not None and r in inflight.rows for r in decoding])
        return real(running, decoding, riding, inflight)

    engine.runner.decode = spy
    try:
        ids = prompt(engine, 0)
        assert engine.submit(ids, max_tokens=12).wait(60).tokens == reference(trained[0], ids, 12)
        assert fed and all(row == [True] for row in fed)  # every step fed its token from the device
    finally:
        engine.close()


def test_overlap_changes_nothing_a_client_sees(trained, monkeypatch):
    """Requests that reuse slots, sample with seeds and penalties, ask for logprobs, stop on a string or their budget:
    the same tokens, texts, finish reasons and logprobs whether the host reads each step's tokens before the next
    step or after it (the overlap)."""
    from glmkit.runner import FastRunner

    def run(overlap: bool) -> list:
        monkeypatch.setattr(FastRunner, "overlap", property(lambda self: overlap))
        engine = Engine(*trained, max_batch_size=4, max_context=512, fast_decode=True, ride_from_batch=2)
        try:
            jobs = [(prompt(engine, i % 3), dict(max_tokens=5 + 3 * i, temperature=0.9 if i % 2 else 0.0, seed=i,
                                                 logprobs=2 if i % 3 == 0 else None, stop=["GPU"] if i == 4 else [],
                                                 frequency_penalty=0.5 if i % 4 == 1 else 0.0,
                                                 presence_penalty=0.3 if i % 4 == 2 else 0.0)) for i in range(9)]
            with engine._wake:  # all queued before the first step: 9 requests through 4 slots
                reqs = [engine.submit(ids, **kw) for ids, kw in jobs]
            return [(r.wait(120).tokens, r.finish_reason, r.text, [(t, round(lp, 4)) for t, lp, _ in r.token_logprobs])
                    for r in reqs]
        finally:
            engine.close()

    overlapped = run(True)
    assert overlapped == run(False)
    assert {reason for _, reason, _, _ in overlapped} >= {"length"}


def test_short_prompts_arriving_together_ride_the_decode_steps_instead_of_a_forward_each(trained):
    engine = Engine(*trained, max_batch_size=8, max_context=512, fast_decode=True, ride_from_batch=4)
    real, prefilled = engine.runner.prefill, []

    def spy(req, n):
        prefilled.append(req)
        return real(req, n)

    engine.runner.prefill = spy
    try:
        jobs = [(prompt(engine, i % 3), 6) for i in range(5)]
        alone = engine.submit(*jobs[0][:1], max_tokens=6).wait(60)
        assert prefilled == [alone]  # a lone request on an idle engine: one prefill forward, the quickest first token
        with engine._wake:  # the engine thread waits for this lock: all five are admitted in the same step
            together = [engine.submit(ids, max_tokens=n) for ids, n in jobs]
        assert [r.wait(60).tokens for r in together] == [reference(trained[0], ids, n) for ids, n in jobs]
        assert prefilled == [alone]  # five at once: they rode the decode steps, no forward of their own
    finally:
        engine.close()


def test_a_request_admitted_mid_batch_gets_its_first_token_before_the_long_one_ends(rambler):
    engine = Engine(*rambler, max_batch_size=4, max_context=1024, fast_decode=True, prefill_chunk=8)
    engine.events = deque()
    try:
        ids = engine.encode([{"role": "user", "content": "Tell me about GPUs."}])
        long = engine.submit(ids, max_tokens=150)
        while len(long.tokens) < 10 and not long.done.is_set():
            time.sleep(0.01)
        short = engine.submit(ids + ids, max_tokens=3)  # prefilled in chunks of 8 between decode steps
        short.wait(60)
        long.wait(120)
        order = [(event, r is short) for event, r in engine.events if event in ("first_token", "finished")]
        assert order.index(("first_token", True)) < order.index(("finished", False))
        assert order.index(("finished", True)) < order.index(("finished", False))
        assert long.finish_reason == "length" and len(long.tokens) == 150 and short.finish_reason == "length"
        assert engine.largest_batch == 2
        assert short.tokens == reference(rambler[0], ids + ids, 3)  # chunked prefill gives the same tokens
    finally:
        engine.close()


def test_a_bad_request_does_not_fail_its_neighbours(fast):
    ids = [prompt(fast, i) for i in range(3)]
    alone = [fast.submit(p, max_tokens=20).wait(60).text for p in ids]

    def explode(piece):
        raise RuntimeError("the caller's callback broke")

    batch = [fast.submit(ids[0], max_tokens=20), fast.submit([10**7] + ids[1], max_tokens=20),
             fast.submit(ids[1], max_tokens=20, on_text=explode), fast.submit(ids[2], max_tokens=20)]
    done = [r.wait(60) for r in batch]
    assert [r.finish_reason for r in done[1:3]] == ["error", "error"]
    assert "outside the vocabulary" in done[1].error and "callback broke" in done[2].error
    assert [done[0].text, done[3].text] == [alone[0], alone[2]]
    for bad in ({"temperature": float("nan")}, {"top_p": 0.0}, {"logit_bias": {10**9: 1.0}}, {"logprobs": 21}):
        with pytest.raises(ValueError):
            fast.submit(ids[0], **bad)
    assert fast.submit(ids[0], max_tokens=4, temperature=1.0, seed=2**200).wait(60).finish_reason == "length"


def test_seeded_sampling_is_the_same_alone_and_among_neighbours(rambler):
    engine = Engine(*rambler, max_batch_size=8, max_context=512, fast_decode=True)
    try:
        ids = engine.encode([{"role": "user", "content": "Tell me about GPUs."}])
        alone = engine.submit(ids, max_tokens=16, temperature=1.0, seed=11).wait(60).tokens
        crowd = [engine.submit(ids[i:], max_tokens=16, temperature=1.0, seed=i) for i in range(5)]
        mine = engine.submit(ids, max_tokens=16, temperature=1.0, seed=11)
        assert mine.wait(60).tokens == alone and all(r.wait(60).finish_reason for r in crowd)
        assert engine.largest_batch > 1
        other = engine.submit(ids, max_tokens=16, temperature=1.0, seed=12).wait(60).tokens
        assert other != alone
    finally:
        engine.close()


def test_logit_bias_penalties_and_logprobs(trained, fast):
    model, _ = trained
    ids = prompt(fast, 0)
    greedy = fast.submit(ids, max_tokens=12, logprobs=3).wait(60)
    first = greedy.tokens[0]
    biased = fast.submit(ids, max_tokens=1, logit_bias={first: -100.0}).wait(60)
    assert biased.tokens and biased.tokens[0] != first
    assert fast.submit(ids, max_tokens=1, logit_bias={7: 100.0}).wait(60).tokens == [7]
    # logprobs are the model's own: log_softmax of its logits, checked at every position
    with torch.no_grad():
        logits = model(torch.tensor([ids + greedy.tokens])).logits[0, len(ids) - 1:-1].float()
    ref = torch.log_softmax(logits, -1)
    assert [t for t, _, _ in greedy.token_logprobs] == greedy.tokens
    for pos, (token, lp, top) in enumerate(greedy.token_logprobs):
        assert lp == pytest.approx(ref[pos, token].item(), abs=1e-4)
        assert [i for i, _ in top] == ref[pos].topk(3).indices.tolist() and top[0][0] == token  # greedy: the top one
    assert sum(torch.tensor([v for _, v in top]).exp()) <= 1 + 1e-5
    # a frequency penalty breaks a rambling loop: fewer repeated tokens than plain greedy
    repeats = [len(r.tokens) - len(set(r.tokens)) for r in (
        fast.submit(ids, max_tokens=60, logit_bias={t: -100.0 for t in fast.eos}).wait(60),
        fast.submit(ids, max_tokens=60, logit_bias={t: -100.0 for t in fast.eos}, frequency_penalty=2.0).wait(60))]
    assert repeats[1] < repeats[0]


def test_batched_sampler_follows_the_distribution_and_top_p():
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.0]]).repeat(4000, 1)
    out = sample(logits, [SamplingRow(temperature=1.0, seed=s) for s in range(4000)])
    freq = torch.bincount(out.tokens, minlength=4) / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)
    out = sample(logits[:400], [SamplingRow(temperature=1.0, top_p=0.5, seed=s) for s in range(400)])
    assert set(out.tokens.tolist()) == {1}  # the top token alone holds 0.58 >= top_p
    out = sample(logits[:400], [SamplingRow(temperature=1.0, top_p=0.7, seed=s) for s in range(400)])
    assert set(out.tokens.tolist()) == {0, 1}  # 0.58 + 0.21 >= 0.7
    noise = uniform_noise(torch.tensor([5, 5, -3]), torch.tensor([0, 1, 0]), 1000)
    assert 0 < noise.min() and noise.max() < 1 and not torch.equal(noise[0], noise[1])


def test_no_leaks_after_200_requests_with_random_cancellations(trained):
    engine = Engine(*trained, max_batch_size=4, max_context=512, fast_decode=True)
    threads = threading.active_count()
    rng = random.Random(0)
    try:
        ids = [prompt(engine, i) for i in range(3)]
        reqs = []
        for i in range(200):
            reqs.append(engine.submit(ids[i % 3], max_tokens=rng.randint(1, 8), temperature=rng.choice([0, 1.0])))
            if rng.random() < 0.3:
                rng.choice(reqs[-5:]).cancel()
        assert all(r.wait(120).done.is_set() for r in reqs)
        reasons = {r.finish_reason for r in reqs}
        assert "cancelled" in reasons and reasons <= {"cancelled", "length", "stop"}
        s = engine.scheduler
        assert not s.running and not s.waiting and sorted(s._free) == list(range(4))
        assert threading.active_count() == threads  # no thread per request
    finally:
        engine.close()
    assert not engine._thread.is_alive()


def test_metrics_parse_and_move(trained):
    from prometheus_client.parser import text_string_to_metric_families

    from glmkit.server import ServerThread, create_app

    engine = Engine(*trained, max_batch_size=4, max_context=512, fast_decode=True)
    srv = ServerThread(create_app(engine)).start()
    base = srv.url.replace("/v1", "")

    def values():
        text = httpx.get(base + "/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
                or s.labels.get("finished_reason") == "length"}

    try:
        before = values()
        r = httpx.post(srv.url + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}).json()
        after = values()
        assert after["glmkit_generation_tokens_total"] - before["glmkit_generation_tokens_total"] == 5
        assert after["glmkit_prompt_tokens_total"] > before["glmkit_prompt_tokens_total"]
        assert after["glmkit_time_to_first_token_seconds_count"] == before["glmkit_time_to_first_token_seconds_count"] + 1
        assert after["glmkit_request_success_total"] == before.get("glmkit_request_success_total", 0) + 1
        assert after["glmkit_kv_slots_total"] == 4 and after["glmkit_num_requests_running"] == 0
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == r["usage"]["completion_tokens"] == 5 and len(content[0]["top_logprobs"]) == 2
        assert content[0]["logprob"] == content[0]["top_logprobs"][0]["logprob"]  # greedy picks the top one
    finally:
        srv.stop()
        engine.close()


def test_streamed_logprobs_cover_every_token(trained):
    import openai

    from glmkit.server import ServerThread, create_app

    engine = Engine(*trained, max_batch_size=4, max_context=512, fast_decode=True)
    srv = ServerThread(create_app(engine)).start()
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(
            model="glm-4-9b-chat", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=12, temperature=0,
            logprobs=True, top_logprobs=1, stream=True, stream_options={"include_usage": True}))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert len(entries) == chunks[-1].usage.completion_tokens
        plain = client.chat.completions.create(
            model="glm-4-9b-chat", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=12, temperature=0,
            logprobs=True)
        assert [e.token for e in entries] == [e.token for e in plain.choices[0].logprobs.content]
        bad = httpx.post(srv.url + "/chat/completions", timeout=60, headers={"content-type": "application/json"},
                         content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
        bad = httpx.post(srv.url + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 5}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    finally:
        srv.stop()
        engine.close()


def test_a_non_streaming_client_that_disconnects_cancels_its_generation(rambler):
    from glmkit.server import ServerThread, create_app

    engine = Engine(*rambler, max_context=2048, fast_decode=True)
    srv = ServerThread(create_app(engine)).start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/chat/completions", timeout=httpx.Timeout(60, read=1.0), json={
                "messages": [{"role": "user", "content": "Tell me about GPUs."}], "max_tokens": 1900, "temperature": 0})
        start = time.time()
        while time.time() - start < 60 and not engine.finished:
            time.sleep(0.05)
        last = engine.finished[-1]
        assert last.finish_reason == "cancelled" and len(last.tokens) < 1900
    finally:
        srv.stop()
        engine.close()


def test_generation_request_fields():
    r = GenerationRequest([1, 2])
    assert (r.presence_penalty, r.frequency_penalty, r.logit_bias, r.logprobs, r.token_logprobs) == (0.0, 0.0, None,
                                                                                                     None, [])


def test_out_of_memory_in_a_decode_step_fails_that_steps_requests_and_the_engine_keeps_serving(trained):
    engine = Engine(*trained, max_batch_size=4, max_context=512, fast_decode=True)
    real, calls = engine.runner.decode, []

    def decode_once_out_of_memory(*args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    engine.runner.decode = decode_once_out_of_memory
    try:
        ids = prompt(engine, 0)
        with engine._wake:  # the engine thread waits for this lock: both are admitted in the same step
            first = [engine.submit(ids, max_tokens=20) for _ in range(2)]
        assert [r.wait(60).finish_reason for r in first] == ["error", "error"]
        assert "out of memory" in first[0].error and "max_batch_size" in first[0].error
        after = engine.submit(ids, max_tokens=20).wait(60)
        assert after.finish_reason == "stop" and "40" in after.text
        assert not engine.scheduler.running
    finally:
        engine.close()


def test_both_incremental_detokenizers_give_the_whole_decode(trained):
    from glmkit.request import Detokenizer

    tok = trained[1]
    ids = tok("GPUs: Ünïcödé 你好, 40 layers.", add_special_tokens=False).input_ids * 3
    stream, window = Detokenizer(tok), Detokenizer(tok)
    window._stream = None  # the fallback for tokenizers without DecodeStream
    assert stream._stream is not None
    assert "".join(map(stream.add, ids)) == "".join(map(window.add, ids)) == tok.decode(ids)
