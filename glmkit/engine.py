"""A batching generation engine: requests from many clients decoded together on the model's device.

The API server and the chat widget submit ``GenerationRequest``s; a background thread takes up to
``max_batch_size`` waiting requests, left-pads their prompts into one batch, and decodes them step by step
with a shared KV cache, each with its own sampling settings, stop strings and token budget. Text arrives
through a callback as it is generated. A cancelled request (a client that disconnected, a stop button)
stops at the next step; an out-of-memory error fails the batch's requests, frees the cache, and the engine
keeps serving. With ``fast_decode=True`` batches go through ``glmkit.fast_decode.FastDecoder`` (static cache,
each prompt prefilled into its own row, one CUDA graph per token) instead of a Python-bound ``forward`` per token.
Introduced in ``notebooks/07_openai_server.ipynb``.

>>> from glmkit.loading import load_model, load_tokenizer
>>> engine = Engine(load_model(device_map="cpu"), load_tokenizer())
>>> req = engine.submit(engine.encode([{"role": "user", "content": "How many layers does GLM-4-9B-Chat have?"}]),
...                     max_tokens=24)
>>> "40" in req.wait().text
True
>>> engine.close()
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from glmkit.fast_decode import FastDecoder


@dataclass
class GenerationRequest:
    """One request: prompt ids in, text out (``on_text`` receives each new piece as it is decoded)."""

    prompt_ids: list[int]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _emitted: int = 0

    def cancel(self) -> None:
        """Stop generating for this request at the next step."""
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> GenerationRequest:
        self.done.wait(timeout)
        return self


class Engine:
    """Owns a model and a tokenizer; decodes submitted requests in batches on a background thread.

    Args:
        max_batch_size: requests decoded together.
        max_context: prompt + new tokens allowed per request (default: the model's limit).
        gather_ms: how long the first waiting request waits for company before its batch starts.
        fast_decode: decode batches with ``FastDecoder`` (one GPU or a layer split, 16/32-bit weights; at batch 1 with its Triton
            kernels). Costs GPU memory: a fused copy of the q/k/v weights (1.4 GiB for GLM-4-9B in bf16) and, per
            batch size in use (rounded up to 1, 2, 4, ...), a static KV cache for the longest request so far
            (rounded up to a power of two, at least 1024 tokens).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 8,
                 max_context: int | None = None, gather_ms: float = 5.0, fast_decode: bool = False) -> None:
        from glmkit.generation import eos_token_ids, model_device

        if fast_decode:
            from glmkit.fast_decode import FastDecoder

            FastDecoder.check(model)  # a quantized or offloaded model: say so now, not at the first request

        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)
        self.eos = set(eos_token_ids(model))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self.max_batch_size = max_batch_size
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 4096))
        self.gather_s = gather_ms / 1000
        self.batches_run = 0
        self.largest_batch = 0
        self.busy = False  # a batch is being decoded
        self.finished: deque[GenerationRequest] = deque(maxlen=64)  # the latest finished requests
        self.fast_decode = fast_decode
        self.fast_requests = 0  # requests decoded by the fast path
        self._fast: dict[int, FastDecoder] = {}  # fast decoders by batch size (1, 2, 4, ...)
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self._thread.start()

    def encode(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
               assistant_prefix: str = "") -> list[int]:
        """Prompt ids for ``messages`` through the GLM-4 chat template (``assistant_prefix`` is appended
        after ``<|assistant|>``, e.g. to force a tool call)."""
        text = self.tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text + assistant_prefix, add_special_tokens=False).input_ids

    def submit(self, prompt_ids: list[int], **kwargs: Any) -> GenerationRequest:
        """Queue a request; returns it at once (``wait()`` for the result, or pass ``on_text`` to stream)."""
        req = GenerationRequest(list(prompt_ids), **kwargs)
        if len(req.prompt_ids) + req.max_tokens > self.max_context:
            raise ValueError(f"{len(req.prompt_ids)} prompt tokens + max_tokens {req.max_tokens} exceed the "
                             f"context of {self.max_context} tokens.")
        self._queue.put(req)
        return req

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.gather_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.perf_counter(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            batch = [r for r in batch if not self._finish_if_cancelled(r)]
            if batch:
                self._run(batch)

    def _finish_if_cancelled(self, req: GenerationRequest) -> bool:
        if req.cancelled.is_set():
            req.finish_reason = "cancelled"
            self.finished.append(req)
            req.done.set()
            return True
        return False

    def _run(self, batch: list[GenerationRequest]) -> None:
        self.busy = True
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            with torch.inference_mode():
                self._decode(batch)
        except Exception as exc:  # torch.OutOfMemoryError included: fail these requests, keep serving
            for req in batch:
                if not req.done.is_set():
                    req.error = f"{type(exc).__name__}: {str(exc)[:500]}"
                    req.finish_reason = "error"
                    req.done.set()
                    self.finished.append(req)
        finally:
            self.busy = False
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _decode(self, batch: list[GenerationRequest]) -> None:
        if self.fast_decode:
            return self._decode_fast(batch)
        from transformers import DynamicCache

        from glmkit.generation import cache_argument

        n = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[i, n - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, n - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kw = {cache_argument(self.model): DynamicCache(config=self.model.config)}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **kw).logits[:, -1].float()

        def step(tokens: torch.Tensor, active: list[bool]) -> torch.Tensor:
            nonlocal mask, positions
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            return self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                              use_cache=True, **kw).logits[:, -1].float()

        self._generate(batch, logits, step, len(batch))

    def _fast_decoder(self, slots: int, need: int) -> FastDecoder:
        """The fast decoder for ``slots`` sequences with room for ``need`` tokens each, kept for later batches."""
        from glmkit.fast_decode import FastDecoder

        decoder = self._fast.get(slots)
        if decoder is None or decoder.max_len < need:
            self._fast.pop(slots, None)  # free the smaller cache first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            # the next power of two (at least 1024) so that longer requests rarely rebuild it, within max_context
            size = max(need, min(max(1024, 1 << (need - 1).bit_length()), self.max_context))
            decoder = self._fast[slots] = FastDecoder(self.model, max_len=size, batch_size=slots)
        return decoder

    def _decode_fast(self, batch: list[GenerationRequest]) -> None:
        """A batch through the fast path: each prompt prefilled into its own row of a static cache, then one
        step (one CUDA graph on a GPU) per token for all rows, each at its own position."""
        slots = 1 << (len(batch) - 1).bit_length()  # 1, 2, 4, 8, ...: few decoder shapes to compile
        decoder = self._fast_decoder(slots, max(len(r.prompt_ids) + r.max_tokens for r in batch))
        self.fast_requests += len(batch)
        logits = [decoder.prefill(torch.tensor([r.prompt_ids], device=self.device), slot=i)[0]
                  for i, r in enumerate(batch)]
        pos = torch.zeros(slots, dtype=torch.long)
        pos[:len(batch)] = torch.tensor([len(r.prompt_ids) for r in batch])

        def step(tokens: torch.Tensor, active: list[bool]) -> torch.Tensor:
            logits = decoder.decode_step(tokens, pos.to(self.device))
            pos.add_(torch.tensor(active, dtype=torch.long))  # finished and idle rows stay where they are
            return logits

        self._generate(batch, logits, step, slots)

    def _generate(self, batch: list[GenerationRequest], logits: Any,
                  step: Callable[[torch.Tensor, list[bool]], torch.Tensor], rows: int) -> None:
        """The token loop of both paths: pick each active request's next token from ``logits`` (row i for
        request i), hand it to the request, and get the next logits from ``step(tokens, active)`` (``rows``
        tokens on the device, the pad id for finished and idle rows) until every request has finished."""
        from glmkit.generation import pick_token

        generators = [torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None else None for r in batch]
        active = [True] * len(batch) + [False] * (rows - len(batch))
        for _ in range(max(r.max_tokens for r in batch)):
            tokens = torch.full((rows,), self.pad_id, dtype=torch.long)
            for i, r in enumerate(batch):
                if active[i]:
                    token = int(pick_token(logits[i], r.temperature, r.top_p, generators[i]))
                    tokens[i] = token
                    active[i] = self._accept(r, token)
            if not any(active):
                return
            logits = step(tokens.to(self.device), active)
        for r in batch:  # token budgets ran out
            if not r.done.is_set():
                self._finish(r, "length")

    def _accept(self, r: GenerationRequest, token: int) -> bool:
        """Add one token to a request; emit new text; return whether it goes on."""
        if r.cancelled.is_set():
            self._finish(r, "cancelled")
            return False
        if token in self.eos:
            self._finish(r, "stop")
            return False
        r.tokens.append(token)
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        text = text[1:] if text.startswith("\n") else text  # GLM-4 writes a newline after <|assistant|>
        for s in r.stop:
            at = text.find(s)
            if at >= 0:
                r.text = text[:at]
                self._emit(r)
                self._finish(r, "stop")
                return False
        hold = max((len(s) - 1 for s in r.stop), default=0)  # a stop string may be starting
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            r.text = text
            self._emit(r, upto=len(text) - hold)
        if len(r.tokens) >= r.max_tokens:
            r.text = text
            self._emit(r)
            self._finish(r, "length")
            return False
        return True

    def _emit(self, r: GenerationRequest, upto: int | None = None) -> None:
        end = len(r.text) if upto is None else max(upto, r._emitted)
        if end > r._emitted and r.on_text is not None:
            r.on_text(r.text[r._emitted:end])
        r._emitted = max(r._emitted, end)

    def _finish(self, r: GenerationRequest, reason: str) -> None:
        self._emit(r)
        r.finish_reason = reason
        self.finished.append(r)
        r.done.set()
