"""Chat turns through GLM-4's chat template, streaming, and chunked prefill for long prompts.

``chat(model, tokenizer, messages)`` runs one assistant turn and returns a ``ChatReply`` (text,
token counts, speed). ``chunked_prefill`` feeds a long prompt through the model a chunk at a time,
so prefill activations scale with the chunk, not the prompt (``plan_memory(prefill_chunk=...)``
budgets exactly this). Introduced in ``notebooks/00_setup.ipynb``.

>>> from glmkit.loading import load_model, load_tokenizer
>>> model, tok = load_model(device_map="cpu"), load_tokenizer()
>>> reply = chat(model, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=4)
>>> reply.new_tokens <= 4
True
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.cache_utils import DynamicLayer

from glmkit.tables import html_table, text_table


@dataclass(repr=False)
class ChatReply:
    """One assistant turn: the text, token counts and wall-clock speed."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str  # "stop" (an end token) or "length" (max_new_tokens reached)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def rows(self) -> list[list[str]]:
        return [["reply", self.text], ["prompt tokens", str(self.prompt_tokens)],
                ["new tokens", str(self.new_tokens)], ["finish", self.finish_reason],
                ["speed", f"{self.tokens_per_second:.1f} tok/s"]]

    def __repr__(self) -> str:
        return text_table(["", "value"], self.rows())

    def _repr_html_(self) -> str:
        return html_table(["", "value"], self.rows(), caption="chat turn")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (GPU 0 of a split model)."""
    return model.get_input_embeddings().weight.device


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
             assistant_prefix: str = "") -> list[int]:
    """Prompt ids for ``messages`` through the GLM-4 chat template, up to ``<|assistant|>`` and then
    ``assistant_prefix`` (e.g. the start of a forced tool call); the engine, the server and ``encode_chat`` use
    them (notebook ``06_chat.ipynb``).

    >>> from glmkit.loading import load_tokenizer
    >>> tokenizer = load_tokenizer()
    >>> tokenizer.decode(chat_ids(tokenizer, [{"role": "user", "content": "Hi"}]))
    '[gMASK]<sop><|user|>\\nHi<|assistant|>'
    """
    text = tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text + assistant_prefix, add_special_tokens=False).input_ids


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Token ids ``[1, n]`` and attention mask for ``messages`` through the GLM-4 chat template (``chat_ids``),
    ready for ``generate``."""
    ids = torch.tensor([chat_ids(tokenizer, messages, tools)], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def eos_token_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """``generate`` arguments: greedy at temperature 0, else sampling with ``temperature`` and ``top_p``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1] (got {temperature}, {top_p}).")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token(s) from logits ``[..., vocab]``: argmax at temperature 0, else top-p sampling.

    >>> pick_token(torch.tensor([[0.1, 3.0, 0.2]])).tolist()
    [1]
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    flat = probs.reshape(-1, probs.shape[-1])
    picked = torch.multinomial(flat / flat.sum(-1, keepdim=True), 1, generator=generator)
    return picked.reshape(probs.shape[:-1])


def clean_reply(text: str) -> str:
    """GLM-4 writes a newline after ``<|assistant|>``; the reply itself starts after it."""
    return text[1:] if text.startswith("\n") else text


def chat(model: torch.nn.Module, tokenizer: Any, messages: Sequence[dict[str, Any]], *,
         max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
         prefill_chunk: int | None = None, tools: Sequence[dict] | None = None) -> ChatReply:
    """Generate one assistant turn for ``messages`` (greedy by default).

    Args:
        max_new_tokens: stop after this many tokens.
        temperature, top_p: sampling (temperature 0 is greedy).
        prefill_chunk: feed the prompt in chunks of this many tokens (long prompts on small cards).
        tools: OpenAI-style tool definitions; they become GLM-4's tool system prompt.
    """
    inputs = encode_chat(tokenizer, messages, tools, model_device(model))
    n_prompt = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.inference_mode():
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, **sampling_kwargs(temperature, top_p))
        if prefill_chunk and n_prompt > prefill_chunk:
            kwargs[cache_argument(model)] = chunked_prefill(model, inputs["input_ids"], prefill_chunk, max_new_tokens)
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, n_prompt:]
    eos = eos_token_ids(model)
    finished = bool(len(new)) and int(new[-1]) in eos
    text = clean_reply(tokenizer.decode(new, skip_special_tokens=True))
    return ChatReply(text, n_prompt, len(new), seconds, "stop" if finished else "length")


def stream_chat(model: torch.nn.Module, tokenizer: Any, messages: Sequence[dict[str, Any]], *,
                max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                stop_event: threading.Event | None = None) -> Iterator[str]:
    """Yield the reply as text pieces while the model generates (``generate`` runs in a thread).

    Setting ``stop_event`` stops generation at the next token.
    """
    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stop = stop_event is not None and stop_event.is_set()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    inputs = encode_chat(tokenizer, messages, None, model_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([_Stop()]), **sampling_kwargs(temperature, top_p))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first = True
    for piece in streamer:
        if first:
            piece, first = piece.lstrip("\n"), not piece.lstrip("\n")
        if piece:
            yield piece
    thread.join()
    if errors:
        raise errors[0]


GQA_ATTENTION = "glmkit_gqa"


def gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for a chunk of new tokens over the cache, without copying K/V to every query head.

    transformers' SDPA path expands K and V from GLM-4's 2 KV heads to all 32 query heads (``repeat_kv``)
    whenever a mask is passed, as it is for every chunk after the first: 1.5 GiB at 96K tokens. Here the
    chunk's causal mask is implied (the chunk is the *last* ``q`` of ``k`` positions: lower-right causal) and
    SDPA runs with ``enable_gqa``; on a GPU that is the flash kernel, with no mask and no copy.
    Registered with transformers as ``"glmkit_gqa"``; for unpadded batches only (transformers passes no mask
    to attention functions it has no mask builder for).
    """
    if attention_mask is not None:
        raise ValueError("gqa_attention takes no attention mask: it is for unpadded prompts (one length per batch).")
    q_len, kv_len = query.shape[2], key.shape[2]
    bias = causal_lower_right(q_len, kv_len) if q_len > 1 else None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_gqa_attention() -> None:
    AttentionInterface.register(GQA_ATTENTION, gqa_attention)


@functools.cache
def _preallocated_layer_class() -> type:
    class PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose K/V live in buffers allocated once for ``capacity`` tokens (views grow)."""

        def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
            super().__init__()
            self.capacity = capacity
            self._given = (keys, values)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
            value_states = key_states if value_states is None else value_states
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self._k, self._v = self._given
            if self._k is None or self._v is None:
                with torch.inference_mode(False):  # normal tensors: generate() updates them outside inference mode
                    self._k = key_states.new_empty(b, h, self.capacity, d)
                    self._v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
            self.keys, self.values = self._k[..., :0, :], self._v[..., :0, :]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"The KV cache holds {self.capacity} tokens and is full: prefill it with room for "
                                 f"more new tokens (chunked_prefill(..., max_new_tokens=...)).")
            self._k[..., start:end, :] = key_states
            self._v[..., start:end, :] = value_states
            self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            n = self.get_seq_length()
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n = self.get_seq_length()
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    return PreallocatedLayer


def preallocated_cache(config: Any, capacity: int, keys: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> Any:
    """A transformers ``DynamicCache`` whose every layer allocates its K/V once, for ``capacity`` tokens.

    ``keys``/``values`` ``[layers, batch, kv_heads, capacity, head_dim]``: buffers to fill instead (the fast
    decoder's static cache, so its prefill writes in place).

    A plain ``DynamicCache`` grows by concatenation: each chunk or token re-allocates every layer's K and V,
    which copies the cache and fragments GPU memory (about 0.7 GiB more reserved than planned at 96K tokens on
    an H100, benchmarks/results/long_context.json). Preallocated, the cache costs what the planner counts.

    >>> from glmkit.models import tiny_glm_config
    >>> cache = preallocated_cache(tiny_glm_config(), capacity=64)
    >>> k, _ = cache.update(torch.zeros(1, 2, 5, 64), torch.zeros(1, 2, 5, 64), 0)
    >>> cache.get_seq_length(), cache.layers[0]._k.shape[2]
    (5, 64)
    """
    cache = DynamicCache(config=config)
    layer = _preallocated_layer_class()
    n = config.num_hidden_layers
    cache.layers = [layer(capacity, None if keys is None else keys[i], None if values is None else values[i])
                    for i in range(n)]
    return cache


def chunked_prefill(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int, max_new_tokens: int = 256,
                    cache: Any = None) -> Any:
    """Run all but the last prompt token through the model ``chunk`` tokens at a time; return the KV cache.

    Pass the cache to ``generate`` (argument ``cache_argument(model)``): it processes the last
    token and continues, with the same tokens as an unchunked ``generate``. Peak activation memory
    is that of one chunk instead of the whole prompt; the chunks attend to the cache through
    ``gqa_attention`` (no mask, no K/V copy per query head), and the model's own attention is restored after.
    The cache is allocated once (``preallocated_cache``) with room for ``max_new_tokens`` generated tokens,
    unless you pass one (``cache``, e.g. a transformers ``DynamicCache``). Prompts must be unpadded. The model's
    attention implementation is switched while the chunks run: run nothing else on the same model meanwhile.

    >>> from glmkit.loading import load_model
    >>> model = load_model(device_map="cpu")
    >>> ids = torch.arange(1, 40)[None]
    >>> cache = chunked_prefill(model, ids, chunk=16, max_new_tokens=8)
    >>> cache.get_seq_length(), model.config._attn_implementation
    (38, 'sdpa')
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}.")
    _register_gqa_attention()
    if cache is None:
        cache = preallocated_cache(model.config, input_ids.shape[1] + max_new_tokens)
    own = model.config._attn_implementation
    model.set_attn_implementation(GQA_ATTENTION)
    try:
        with torch.inference_mode():
            for start in range(0, input_ids.shape[1] - 1, chunk):
                end = min(start + chunk, input_ids.shape[1] - 1)
                model(input_ids[:, start:end], use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    finally:
        model.set_attn_implementation(own)
    return cache


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` in transformers >= 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
