"""What one generation request is and where it stands: prompt and settings in, tokens, text and log-probs out.

``GenerationRequest`` is what callers of ``glmkit.engine.Engine`` hold; the engine's scheduler keeps its
progress (cache slot, prompt tokens prefilled so far, tokens generated) in the same object. ``Detokenizer``
turns tokens into text incrementally: each new token decodes a short window, not the whole reply again.
Introduced in ``notebooks/07_openai_server.ipynb``.

>>> from glmkit.loading import load_tokenizer
>>> tok = load_tokenizer()
>>> d = Detokenizer(tok)
>>> "".join(d.add(t) for t in tok("Hello GPU world", add_special_tokens=False).input_ids)
'Hello GPU world'
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.sampling import SamplingRow


class Detokenizer:
    """Text from tokens as they come: ``add(token)`` returns the new text (empty while a multi-byte character
    is incomplete). With a fast tokenizer, the ``tokenizers`` library's own ``DecodeStream`` (2 µs a token here,
    against 33 µs for decoding a window with ``tokenizer.decode``); else a window of a few tokens per call (as
    vLLM's incremental detokenizer does)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] decode to text already returned
        self.read = 0
        self._backend, self._stream = getattr(tokenizer, "_tokenizer", None), None
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:  # pragma: no cover - tokenizers < 0.21
            return
        if isinstance(self._backend, Tokenizer):
            self._stream = DecodeStream(skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token) or ""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        now = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if now.endswith("\ufffd") or len(now) <= len(before):  # an unfinished character, or nothing printable
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return now[len(before):]


@dataclass(eq=False)
class GenerationRequest:
    """One request: prompt ids in, text out (``on_text`` receives each new piece as it is decoded, on the engine's
    thread; ``on_done`` the request once it has finished, however it finished).

    ``logprobs``: ``None`` for none; ``k >= 0`` records each generated token's log-probability and the top ``k``
    alternatives in ``token_logprobs`` as ``(token id, logprob, [(id, logprob), ...])``.
    """

    prompt_ids: list[int]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[GenerationRequest], None] | None = None
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side progress
    submitted_at: float = 0.0
    first_token_at: float | None = None
    slot: int | None = None  # row of the KV cache while running
    prefilled: int = 0  # prompt tokens whose K/V are in the cache
    inflight: int = 0  # tokens sampled on the device whose values the host has not read yet (0 or 1)
    _seed: int = 0  # the seed actually used (a random one when ``seed`` is None)
    _emitted: int = 0
    _detok: Detokenizer | None = None
    _raw: str = ""  # all decoded text, before the leading newline is dropped and stop strings cut it

    def cancel(self) -> None:
        """Stop generating for this request at the next step."""
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> GenerationRequest:
        self.done.wait(timeout)
        return self

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(self.temperature, self.top_p, self._seed, len(self.tokens) + self.inflight, self.presence_penalty,
                           self.frequency_penalty, self.logit_bias, self.slot or 0)


@dataclass(eq=False)
class Inflight:
    """One step's sampled tokens, still on the device: row ``i`` is ``requests[i]``'s next token. The engine queues
    the next decode step (which takes these tokens on the device) before it reads them, so the host's work on one
    step (detokenizing, stop strings, callbacks) runs while the device computes the next.

    ``host``: pinned host copies being made of the tokens (and, with log-probabilities, the chosen token's, the top
    ids and theirs); ``ready``: a CUDA event recorded after those copies (None on a CPU, where they are done)."""

    requests: list[GenerationRequest]
    tokens: torch.Tensor
    host: list[torch.Tensor]
    ready: Any = None
    rows: dict[GenerationRequest, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = {r: i for i, r in enumerate(self.requests)}

    def read(self) -> list[list]:
        """The host copies as lists (waits for them, which by now is rarely a wait)."""
        if self.ready is not None:
            self.ready.synchronize()
        return [t.tolist() for t in self.host]
