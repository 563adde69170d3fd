"""Next tokens for a whole batch in one call on the model's device, each row with its own settings.

Greedy or temperature + top-p sampling, OpenAI's presence/frequency penalties and ``logit_bias``, and the chosen
token's log-probability with the top ``k`` alternatives. A seeded row draws its random numbers from a counter-based
hash of (seed, token index, vocabulary id) computed on the device, so it picks the same tokens whatever its batch
neighbours are, alone or in a batch of 64, with no per-request ``torch.Generator`` (one kernel per row) in the loop.
Log-probabilities are those of the model's own distribution (``log_softmax`` of its logits, before temperature,
penalties and bias), as vLLM reports by default. Used by ``glmkit.engine``; introduced in
``notebooks/07_openai_server.ipynb``.

>>> logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
>>> rows = [SamplingRow(), SamplingRow(logit_bias={0: -100.0})]
>>> out = sample(logits, rows, logprobs=1)
>>> out.tokens.tolist(), out.top_ids.tolist()
([1, 2], [[1], [0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass
class SamplingRow:
    """One row's settings: ``seed`` (any integer) and ``step`` (how many tokens it has generated) pick its noise;
    ``slot`` is its row in the ``counts`` table of generated tokens (for the penalties)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    step: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    slot: int = 0


@dataclass
class Sampled:
    """Tokens ``[n]``; with logprobs: the chosen token's ``logprob`` ``[n]`` and ``top_ids``/``top_logprobs``
    ``[n, k]`` (all on the device)."""

    tokens: torch.Tensor
    logprob: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def check_row(row: SamplingRow, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the setting if ``row`` cannot be sampled (NaN, out of range, unknown token id).

    >>> check_row(SamplingRow(temperature=float("nan")), 10)
    Traceback (most recent call last):
    ...
    ValueError: temperature must be a finite number >= 0, got nan.
    """
    if not (math.isfinite(row.temperature) and row.temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {row.temperature}.")
    if not (math.isfinite(row.top_p) and 0 < row.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {row.top_p}.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(row, name)
        if not (math.isfinite(value) and -2 <= value <= 2):
            raise ValueError(f"{name} must be in [-2, 2], got {value}.")
    for token, bias in (row.logit_bias or {}).items():
        if not (isinstance(token, int) and 0 <= token < vocab_size):
            raise ValueError(f"logit_bias names token {token!r}; token ids here are 0..{vocab_size - 1}.")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}.")


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Chris Wellons' lowbias32 family) on int64 tensors holding values < 2**32: the
    multipliers stay below 2**31, so no product overflows int64 on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform numbers in (0, 1) ``[n, vocab]`` that depend only on each row's (seed, step) and the column."""
    key = _hash32((seeds & MASK32) ^ _hash32(((seeds >> 32) & MASK32) ^ _hash32(steps & MASK32)))  # [n]
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(key[:, None] ^ _hash32(cols)[None, :])  # [n, vocab]
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def _signed64(seed: int) -> int:
    seed &= (1 << 64) - 1  # any Python integer is a valid seed: its low 64 bits
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device`` without waiting for the work queued there: on a GPU through pinned host
    memory, so the copy joins the stream instead of stalling the host until the stream is idle (a copy from
    ordinary host memory waits for it, which would undo the engine's overlap of host and device work)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, torch.float32, like.device)[:, None]


def sample(logits: torch.Tensor, rows: list[SamplingRow], logprobs: int | None = None,
           counts: torch.Tensor | None = None) -> Sampled:
    """Pick one token per row of ``logits`` ``[n, vocab]`` with ``rows[i]``'s settings.

    Args:
        logprobs: ``None``: no log-probabilities; ``k >= 0``: the chosen token's and the top ``k``.
        counts: ``[slots, vocab]`` generated-token counts, indexed by ``row.slot`` (needed for the penalties).
    """
    logits = logits.float()
    n, vocab = logits.shape
    device = logits.device
    out = Sampled(tokens=logits.argmax(-1))
    if logprobs is not None:
        raw = torch.log_softmax(logits, dim=-1)
    x = logits
    changed = False
    biased = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.logit_bias or {}).items()]
    if biased:
        i, t, b = zip(*biased)
        x = x.index_put((to_device(i, torch.long, device), to_device(t, torch.long, device)),
                        to_device(b, x.dtype, device), accumulate=True)
        changed = True
    if counts is not None and any(r.presence_penalty or r.frequency_penalty for r in rows):
        c = counts[to_device([r.slot for r in rows], torch.long, device)].float()  # [n, vocab]
        x = x - _column([r.frequency_penalty for r in rows], x) * c \
              - _column([r.presence_penalty for r in rows], x) * (c > 0).float()
        changed = True
    if changed:
        out.tokens = x.argmax(-1)
    if any(r.temperature > 0 for r in rows):
        temps = [r.temperature if r.temperature > 0 else 1.0 for r in rows]
        probs = torch.softmax(x / _column(temps, x), dim=-1)
        if any(r.top_p < 1 for r in rows):
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < _column([r.top_p for r in rows], x)  # keeps the top token
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
        seeds_steps = to_device([[_signed64(r.seed) for r in rows], [r.step for r in rows]], torch.int64, device)
        noise = uniform_noise(seeds_steps[0], seeds_steps[1], vocab)
        # the exponential race: argmax(p / E) with E ~ Exp(1) draws a token with probability p
        drawn = (probs / -torch.log(noise)).argmax(-1)
        hot = to_device([r.temperature > 0 for r in rows], torch.bool, device)
        out.tokens = torch.where(hot, drawn, out.tokens)
    if logprobs is not None:
        out.logprob = raw.gather(-1, out.tokens[:, None])[:, 0]
        out.top_logprobs, out.top_ids = raw.topk(min(logprobs, vocab), dim=-1)
    return out
