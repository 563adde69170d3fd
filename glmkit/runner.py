"""What runs: the engine's model runners, which own the model, the KV cache and (on a GPU) the CUDA graphs.

``FastRunner`` (continuous batching): one ``FastDecoder`` (one GPU or a layer split; GLM in 16/32-bit or
bitsandbytes nf4/fp4) with a static cache of ``slots`` rows; a request prefills into its own row one chunk per call,
at any step, while the other rows decode; a decode step runs rows ``0..k-1`` (``k`` = the highest running slot + 1),
the decoder choosing its smallest captured batch size >= ``k``. Rows that are not decoding get a dummy token at the
position their next real write goes to, where it is overwritten before it is ever attended to.

``PlainRunner`` (static batching: the engine's default, and for models the fast path does not take: int8 or other
quantizations than bitsandbytes nf4/fp4, offloaded, not GLM): the prompts of one batch are left-padded and prefilled
together with ``model.forward`` and a transformers cache, then decoded together until the last one ends. Requests
cannot join a running batch: the left-padded cache would have to be re-padded, and transformers' own continuous
batching (``generate_batch``) takes one generation config for all requests and no per-token callbacks. Introduced in
``notebooks/07_openai_server.ipynb``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from glmkit.fast_decode import FastDecoder
from glmkit.generation import cache_argument
from glmkit.request import GenerationRequest, Inflight
from glmkit.sampling import to_device


class FastRunner:
    """Continuous batching over the rows of one ``FastDecoder`` (built at the first request), or of ``decoder``: one
    built by the caller with the same contract (``prefill(ids, chunk, slot, start)``, ``decode_step(tokens, pos)``),
    e.g. the tensor-parallel ``TPLeader``; the model's own weights are then never run."""

    continuous = True

    def __init__(self, model: torch.nn.Module, slots: int, max_len: int, device: torch.device,
                 decoder: Any = None) -> None:
        if decoder is None:
            FastDecoder.check(model)  # an int8 or offloaded model: say so now, not at the first request
        elif decoder.batch_size < slots or decoder.max_len < max_len:
            raise ValueError(f"The decoder given holds {decoder.batch_size} rows of {decoder.max_len} tokens; the engine "
                             f"needs {slots} rows of {max_len}: build it with batch_size={slots}, max_len={max_len}.")
        self.model, self.slots, self.max_len, self.device = model, slots, max_len, device
        self.decoder: Any = decoder

    def _decoder(self) -> Any:
        if self.decoder is None:
            self.decoder = FastDecoder(self.model, max_len=self.max_len, batch_size=self.slots)
        return self.decoder

    def prefill(self, req: GenerationRequest, n: int) -> torch.Tensor | None:
        """Put the next ``n`` prompt tokens of ``req`` into its row; the last position's logits ``[vocab]`` once the
        whole prompt is in, else None."""
        start = req.prefilled
        ids = self._tensor([req.prompt_ids[start:start + n]])
        logits = self._decoder().prefill(ids, slot=req.slot, start=start)
        req.prefilled += n
        return logits[0] if req.prefilled == len(req.prompt_ids) else None

    @property
    def overlap(self) -> bool:
        """Whether a step may take the previous step's sampled tokens on the device (``FastDecoder``), so the engine
        can read them only after it has queued the next step; a decoder that needs them on the host (the
        tensor-parallel ``TPLeader`` sends them to its other processes) gets them read first."""
        return self.decoder is None or isinstance(self.decoder, FastDecoder)

    def _tensor(self, values: list) -> torch.Tensor:
        """``values`` (token ids, positions) as a long tensor for the decoder: on its device without waiting for the
        work queued there (the overlap), or on the host for a decoder that sends them on (``TPLeader``)."""
        return to_device(values, torch.long, self.device) if self.overlap else torch.tensor(values, dtype=torch.long)

    def decode(self, running: dict[int, GenerationRequest], decoding: list[GenerationRequest],
               riding: list[GenerationRequest] = (), inflight: Inflight | None = None,
               ) -> tuple[torch.Tensor, list[tuple[GenerationRequest, torch.Tensor]]]:
        """One token for each request in ``decoding`` and the next prompt token of each in ``riding``: the logits
        ``[len(decoding), vocab]``, and (request, logits ``[vocab]``) for the riding ones whose prompt is now all in.
        A decoding request whose last token is still in ``inflight`` (sampled by the step before, not yet read on
        the host) is fed that token on the device."""
        k = max(running) + 1
        tokens, pos, source = [0] * k, [0] * k, [-1] * k
        for slot, r in running.items():  # a prefilling row: its next prompt position (the next chunk overwrites it)
            pos[slot] = r.prefilled
        for r in riding:
            tokens[r.slot] = r.prompt_ids[r.prefilled]
        for r in decoding:
            row = inflight.rows.get(r, -1) if inflight is not None else -1
            if row >= 0:
                source[r.slot] = row
            else:
                tokens[r.slot] = r.tokens[-1]
            pos[r.slot] = len(r.prompt_ids) + len(r.tokens) + r.inflight - 1
        both = self._tensor([tokens, pos, source])
        feed = both[0]
        if any(s >= 0 for s in source):  # only with overlap: a decoder reading on the host had its tokens read first
            picked = inflight.tokens.to(self.device)[both[2].clamp(min=0)]
            feed = torch.where(both[2] >= 0, picked, both[0])
        decoder = self._decoder()
        # a FastDecoder's lone row attends over the shortest cache span that holds the step's positions (cache_spans)
        span_hint = {"reach": max(pos)} if isinstance(decoder, FastDecoder) else {}
        logits = decoder.decode_step(feed, both[1], **span_hint)
        done = []
        for r in riding:
            r.prefilled += 1
            if r.prefilled == len(r.prompt_ids):
                done.append((r, logits[r.slot].clone()))
        rows = [r.slot for r in decoding]
        if rows == list(range(k)):
            return logits, done
        return logits[to_device(rows, torch.long, logits.device)], done  # lm_head's device

    def release(self, req: GenerationRequest) -> None:
        pass  # the row is simply reused: its stale K/V are never attended to

    def reset(self) -> None:
        pass


class PlainRunner:
    """Static batching with ``model.forward``: one left-padded batch at a time (the batch's rows are its slots)."""

    continuous = False
    overlap = False  # a decode step takes its tokens from the host

    def __init__(self, model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
        self.model, self.pad_id, self.device = model, pad_id, device
        self.rows = 0
        self.live: set[int] = set()
        self.cache: Any = None
        self.mask = self.positions = None

    def prefill_batch(self, reqs: list[GenerationRequest]) -> torch.Tensor:
        """Prefill the new batch ``reqs`` (slots 0..n-1); the logits of each prompt's last position ``[n, vocab]``."""
        self.reset()
        self.rows, self.live = len(reqs), {r.slot for r in reqs}
        n = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((self.rows, n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((self.rows, n), dtype=torch.long)
        for r in reqs:  # left padding: every prompt ends at the last column
            ids[r.slot, n - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[r.slot, n - len(r.prompt_ids):] = 1
        self.mask, ids = mask.to(self.device), ids.to(self.device)
        self.cache = {cache_argument(self.model): DynamicCache(config=self.model.config)}
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                            logits_to_keep=1, **self.cache).logits[:, -1].float()
        for r in reqs:
            r.prefilled = len(r.prompt_ids)
        return logits

    def decode(self, running: dict[int, GenerationRequest], decoding: list[GenerationRequest],
               riding: list[GenerationRequest] = (), inflight: Inflight | None = None) -> tuple[torch.Tensor, list]:
        tokens = [self.pad_id] * self.rows  # finished rows go on with the pad token until the batch ends
        for r in decoding:
            tokens[r.slot] = r.tokens[-1]
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1
        logits = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=self.mask,
                            position_ids=self.positions, use_cache=True, **self.cache).logits[:, -1].float()
        return logits[torch.tensor([r.slot for r in decoding], device=self.device)], []

    def release(self, req: GenerationRequest) -> None:
        self.live.discard(req.slot)
        if not self.live:
            self.reset()

    def reset(self) -> None:
        """Drop the batch's cache (when it ends, or after an error)."""
        self.cache = self.mask = self.positions = None
        self.rows, self.live = 0, set()
