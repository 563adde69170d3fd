"""The generation engine every caller submits to: the API server, the chat widget and ``glmkit generate``.

A background thread repeats ``step()``: **schedule** (cancelled requests leave, waiting ones take free KV-cache
slots), **run** (one chunk of a waiting prompt is prefilled into its slot, then one decode step for every running
request), **postprocess** (one sampling call for the whole batch on the device, then per request: incremental
detokenization, stop strings, end tokens, token budget, callbacks). With ``fast_decode=True`` (GLM in 16/32-bit or
bitsandbytes nf4/fp4) this is continuous batching over ``FastDecoder``'s static cache: requests join and leave at
every step, so a short request never waits for a long one; and host and device overlap: a step's sampled tokens stay
on the device, feed the next step there, and reach the host (pinned memory, one copy) while the device computes that
next step, so the host's postprocessing costs no device time. On one H200 the server then delivers 93% / 82% / 70%
of its decoder's own tokens/s at 1 / 16 / 64 clients (``benchmarks/results/server_load_gpu_cb.json``). The plain
path (the default, and the one for models the fast path refuses: int8 or other non-nf4/fp4 quantizations, offloaded
or non-GLM models) batches statically: a batch runs until its last request ends (``glmkit.runner`` says why). A
request that fails (bad settings, an out-of-memory error while prefilling it) fails alone; an out-of-memory error in
a decode step fails that step's requests, and the engine keeps serving. Introduced in
``notebooks/07_openai_server.ipynb``.

>>> from glmkit.loading import load_model, load_tokenizer
>>> engine = Engine(load_model(device_map="cpu"), load_tokenizer())
>>> req = engine.submit(engine.encode([{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}]),
...                     max_tokens=24)
>>> "40" in req.wait().text
True
>>> engine.close()
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from glmkit.generation import chat_ids, clean_reply, eos_token_ids, model_device
from glmkit.metrics import engine_metrics
from glmkit.request import Detokenizer, GenerationRequest, Inflight
from glmkit.runner import FastRunner, PlainRunner
from glmkit.sampling import check_row, sample, to_device
from glmkit.scheduler import Scheduler

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class Engine:
    """Owns a model and a tokenizer; decodes submitted requests together on a background thread.

    Args:
        max_batch_size: requests running at once (KV-cache slots); more wait in a queue.
        max_context: prompt + new tokens allowed per request (default: the model's limit).
        gather_ms: static batching (plain path) only: how long the first waiting request waits for company.
        fast_decode: continuous batching with ``FastDecoder`` (one GPU or a layer split; GLM weights in 16/32-bit or
            bitsandbytes nf4/fp4, the 4-bit ones read in place by glmkit's kernels; an int8, otherwise quantized or
            offloaded model is refused here, with what to load instead). Costs GPU memory: in 16/32-bit a fused copy
            of the q/k/v weights (1.4 GiB for GLM-4-9B in bf16; none in 4 bits) and a static KV cache of
            ``max_batch_size`` x ``max_context`` tokens (40 KiB a token for GLM-4-9B in bf16), made at the first request.
        prefill_chunk: prompt tokens prefilled per step (fast path): a long prompt delays the running requests by
            at most one chunk per step.
        ride_from_batch, ride_max_tokens: fast path: while at least ``ride_from_batch`` requests decode or wait with
            prompts of at most ``ride_max_tokens`` tokens, those prompts are fed through the decode steps, one token
            per step in their own rows, instead of a prefill forward each that would stall every running request;
            with fewer, a prompt is prefilled at once (the shortest time to first token).
        continuous: ``False`` batches the fast path statically too (to compare; default: continuous on the fast
            path, static on the plain path).
        decoder: a fast decoder built by the caller (implies ``fast_decode``), holding at least ``max_batch_size``
            rows of ``max_context + 1`` tokens: ``glmkit serve --tp 2`` passes a ``TPLeader`` (notebook 08); the
            model then only gives its config and end tokens.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 8,
                 max_context: int | None = None, gather_ms: float = 5.0, fast_decode: bool = False,
                 prefill_chunk: int = 512, continuous: bool | None = None, ride_from_batch: int = 4,
                 ride_max_tokens: int = 64, decoder: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = decoder.device if decoder is not None else model_device(model)
        self._logits_device = decoder.device if decoder is not None else None  # else the lm_head's
        self.eos = set(eos_token_ids(model))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self.vocab_size = int(model.config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 4096))
        self.gather_s = gather_ms / 1000
        self.prefill_chunk = prefill_chunk
        self.ride_from_batch, self.ride_max_tokens = ride_from_batch, ride_max_tokens
        self.fast_decode = fast_decode or decoder is not None
        self.runner: FastRunner | PlainRunner = (
            FastRunner(model, max_batch_size, self.max_context + 1, self.device, decoder) if self.fast_decode
            else PlainRunner(model, self.pad_id, self.device))
        if continuous and not self.runner.continuous:
            raise ValueError("Continuous batching needs the fast path (fast_decode=True); the plain path batches "
                             "statically.")
        self.scheduler = Scheduler(max_batch_size, self.runner.continuous if continuous is None else continuous)
        self.metrics = engine_metrics(max_batch_size)
        self.batches_run = 0  # steps that admitted requests
        self.steps = 0
        self.largest_batch = 0
        self.fast_requests = 0  # requests decoded by the fast path
        self.finished: deque[GenerationRequest] = deque(maxlen=64)  # the latest finished requests
        self.events: deque[tuple[str, GenerationRequest]] | None = None  # set to a deque to record (event, request)
        self._counts: torch.Tensor | None = None  # [slots, vocab] generated-token counts (penalties), when needed
        self._inflight: Inflight | None = None  # the last step's sampled tokens, not read on the host yet
        self._last_decode: float | None = None  # when the last decode step was queued (time per output token)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Requests are running."""
        return bool(self.scheduler.running)

    def encode(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
               assistant_prefix: str = "") -> list[int]:
        """Prompt ids for ``messages`` through the GLM-4 chat template (``assistant_prefix`` is appended
        after ``<|assistant|>``, e.g. to force a tool call)."""
        return chat_ids(self.tokenizer, messages, tools, assistant_prefix)

    def submit(self, prompt_ids: list[int], **kwargs: Any) -> GenerationRequest:
        """Queue a request; returns it at once (``wait()`` for the result, or pass ``on_text`` to stream).
        Raises ``ValueError`` for settings no step could run (too long, NaN temperature, unknown token ids)."""
        req = GenerationRequest(list(prompt_ids), **kwargs)
        if not req.prompt_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        if len(req.prompt_ids) + req.max_tokens > self.max_context:
            raise ValueError(f"{len(req.prompt_ids)} prompt tokens + max_tokens {req.max_tokens} exceed the "
                             f"context of {self.max_context} tokens.")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs (top alternatives) must be in 0..{MAX_LOGPROBS}, got {req.logprobs}.")
        check_row(req.sampling_row(), self.vocab_size)
        req._seed = req.seed if req.seed is not None else random.getrandbits(63)
        req._detok = Detokenizer(self.tokenizer)
        req.submitted_at = time.perf_counter()
        self.scheduler.add(req)
        self._record("submitted", req)
        with self._wake:
            self._wake.notify()
        return req

    def close(self) -> None:
        """Stop the engine thread; requests still queued or running finish as cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.scheduler.has_work():
                    self._wake.wait()
                if self._closed:
                    break
                self._gather()
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a bug in the engine itself: fail what runs, keep serving the rest
                self._inflight = None
                for r in list(self.scheduler.running.values()):
                    self._fail(r, exc)
        for r in list(self.scheduler.running.values()) + list(self.scheduler.waiting):
            r.cancel()
            self._finish(r, "cancelled")

    def _gather(self) -> None:
        """Static batching: let the first waiting request wait ``gather_ms`` for company (lock held, so submits wake it)."""
        s = self.scheduler
        if s.continuous or s.running or not s.waiting:
            return
        deadline = s.waiting[0].submitted_at + self.gather_s
        while len(s.waiting) < s.slots and not self._closed and time.perf_counter() < deadline:
            self._wake.wait(max(deadline - time.perf_counter(), 0))

    def step(self) -> None:
        """One engine step: schedule, run (prefill chunks, one decode step), sample on the device, then postprocess
        the tokens of the step before (on the fast path the device computes this step meanwhile)."""
        s = self.scheduler
        self.steps += 1
        for r in s.drop_waiting(lambda r: r.cancelled.is_set()):
            self._finish(r, "cancelled")
        for r in [r for r in s.running.values() if r.cancelled.is_set()]:
            self._finish(r, "cancelled")
        admitted = [r for r in s.admit() if self._admit(r)]
        if admitted:
            self.batches_run += 1
        picks: list[tuple[GenerationRequest, torch.Tensor]] = []  # (request, logits [vocab]) to sample from
        # a request whose budget the token in flight completes decodes no further
        decoding = [r for r in s.decoding() if len(r.tokens) + r.inflight < r.max_tokens]
        riding = []
        if isinstance(self.runner, FastRunner):
            short = [r for r in s.prefilling() if len(r.prompt_ids) - r.prefilled <= self.ride_max_tokens]
            if len(decoding) + len(short) >= self.ride_from_batch:  # they ride the decode steps: no stall for the batch
                riding = short
            for r, n in s.prefill_plan(self.prefill_chunk, skip=set(riding)):
                try:
                    logits = self.runner.prefill(r, n)
                except Exception as exc:  # this prompt's prefill failed (out of memory, ...): it fails alone
                    self._fail(r, exc)
                    continue
                if logits is not None:
                    picks.append((r, logits))
        elif admitted:
            try:
                logits = self.runner.prefill_batch(admitted)
                picks += [(r, logits[i]) for i, r in enumerate(admitted)]
            except Exception as exc:
                for r in admitted:
                    self._fail(r, exc)
        if decoding or riding:
            try:
                logits, done = self.runner.decode(s.running, decoding, riding, self._inflight)
                picks += list(zip(decoding, logits)) + done
            except Exception as exc:  # out of memory in a decode step: fail that step's requests
                for r in decoding + riding:
                    self._fail(r, exc)
                self.runner.reset()
            self.largest_batch = max(self.largest_batch, len(decoding))
            if self.metrics:
                self.metrics.batch.observe(len(decoding))
        if self.metrics and decoding:  # time per output token: between consecutive steps that decode tokens
            now = time.perf_counter()
            if self._last_decode is not None:
                self.metrics.tpot.observe(now - self._last_decode)
            self._last_decode = now
        elif not decoding:
            self._last_decode = None
        launched = self._sample([p for p in picks if not p[0].done.is_set()])
        self._collect()  # the step before's tokens: read while the device computes this one
        self._inflight = launched
        if not self.runner.overlap:
            self._collect()
        if self.metrics:
            self.metrics.running.set(len(s.running))
            self.metrics.waiting.set(len(s.waiting))
            self.metrics.slots_used.set(len(s.running))

    def _admit(self, r: GenerationRequest) -> bool:
        """Checks at admission (on the engine thread): a bad prompt fails alone, before it joins a batch."""
        bad = [t for t in r.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            self._fail(r, ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"))
            return False
        if r.presence_penalty or r.frequency_penalty:
            if self._counts is None:
                head = self._logits_device or self.model.get_output_embeddings().weight.device
                self._counts = torch.zeros(self.max_batch_size, self.vocab_size, dtype=torch.int32, device=head)
            self._counts[r.slot].zero_()
        if self.fast_decode:
            self.fast_requests += 1
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self._record("admitted", r)
        return True

    def _sample(self, picks: list[tuple[GenerationRequest, torch.Tensor]]) -> Inflight | None:
        """Queue one sampling call for the whole batch on the device and the copies of its results to the host;
        the requests' ``inflight`` count says a token is on its way."""
        if not picks:
            return None
        reqs = [r for r, _ in picks]
        want = [r.logprobs for r in reqs if r.logprobs is not None]
        try:
            logits = torch.stack([row for _, row in picks])
            out = sample(logits, [r.sampling_row() for r in reqs], max(want) if want else None, self._counts)
            if self._counts is not None:
                slots = to_device([r.slot for r in reqs], torch.long, self._counts.device)
                self._counts.index_put_((slots, out.tokens), torch.ones_like(out.tokens, dtype=torch.int32),
                                        accumulate=True)
            results = [out.tokens] + ([out.logprob, out.top_ids, out.top_logprobs] if want else [])
            cuda = out.tokens.device.type == "cuda"
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in results]
            for h, t in zip(host, results):
                h.copy_(t, non_blocking=cuda)
            ready = None
            if cuda:  # on the device that holds the tokens (lm_head's: the last of a split), whose stream copies them
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(out.tokens.device))
        except Exception as exc:
            for r in reqs:
                self._fail(r, exc)
            return None
        for r in reqs:
            r.inflight += 1
        return Inflight(reqs, out.tokens, host, ready)

    def _collect(self) -> None:
        """Read the tokens in flight on the host and postprocess them (a request finished meanwhile drops its)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        for r in inflight.requests:
            r.inflight -= 1
        try:
            values = inflight.read()
        except Exception as exc:
            for r in inflight.requests:
                self._fail(r, exc)
            return
        tokens, lps = values[0], values[1:] or None
        for i, (r, token) in enumerate(zip(inflight.requests, tokens)):
            if r.done.is_set():
                continue
            try:
                self._accept(r, token, None if lps is None or r.logprobs is None else
                             (token, lps[0][i], list(zip(lps[1][i], lps[2][i]))[:r.logprobs]))
            except Exception as exc:  # e.g. the caller's on_text raised: that request fails, not its neighbours
                self._fail(r, exc)

    # ------------------------------------------------------------------------------------ postprocess
    def _accept(self, r: GenerationRequest, token: int, logprob: Any) -> None:
        """Add one token to a request; emit new text; finish it on an end token, a stop string or its budget."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            self._record("first_token", r)
            if self.metrics:
                self.metrics.ttft.observe(r.first_token_at - r.submitted_at)
        if r.cancelled.is_set():
            return self._finish(r, "cancelled")
        if token in self.eos:
            return self._finish(r, "stop")
        r.tokens.append(token)
        if logprob is not None:
            r.token_logprobs.append(logprob)
        if self.metrics:
            self.metrics.generation_tokens.inc()
        r._raw += r._detok.add(token)
        text = clean_reply(r._raw)
        if r.stop:
            longest = max(len(s) for s in r.stop)
            since = max(len(r.text) - longest, 0)  # a stop string can only end in the new text
            ats = [at for s in r.stop if (at := text.find(s, since)) >= 0]
            if ats:
                r.text = text[:min(ats)]
                return self._finish(r, "stop")
            r.text = text
            self._emit(r, upto=len(text) - (longest - 1))  # a stop string may be starting: hold its length back
        else:
            r.text = text
            self._emit(r)
        if len(r.tokens) >= r.max_tokens:
            self._finish(r, "length")

    def _emit(self, r: GenerationRequest, upto: int | None = None) -> None:
        end = len(r.text) if upto is None else max(upto, r._emitted)
        if end > r._emitted and r.on_text is not None:
            r.on_text(r.text[r._emitted:end])
        r._emitted = max(r._emitted, end)

    def _fail(self, r: GenerationRequest, exc: BaseException) -> None:
        oom = isinstance(exc, torch.OutOfMemoryError)
        r.error = f"{type(exc).__name__}: {str(exc)[:500]}" + (
            " (out of memory: fewer concurrent requests, a smaller max_batch_size or shorter prompts fit)" if oom else "")
        if oom and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._finish(r, "error")

    def _finish(self, r: GenerationRequest, reason: str) -> None:
        if r.done.is_set():
            return
        if r.slot is not None and self.scheduler.running.get(r.slot) is r:
            self.scheduler.release(r)
            self.runner.release(r)
        try:
            if reason != "error":
                self._emit(r)
        except Exception as exc:
            r.error, reason = f"{type(exc).__name__}: {str(exc)[:500]}", "error"
        r.finish_reason = reason
        self.finished.append(r)
        if self.metrics:
            self.metrics.finished.labels(reason).inc()
        self._record("finished", r)
        r.done.set()
        if r.on_done is not None:
            try:
                r.on_done(r)
            except Exception:  # noqa: S110 - a caller's callback must not stop the engine
                pass

    def _record(self, event: str, r: GenerationRequest) -> None:
        if self.events is not None:
            self.events.append((event, r))
