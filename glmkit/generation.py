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

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Token ids and attention mask for ``messages`` through the GLM-4 chat template, ready for ``generate``."""
    enc = tokenizer.apply_chat_template(list(messages), tools=tools or None, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    return {k: v.to(device) for k, v in enc.items()}


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
            kwargs[cache_argument(model)] = chunked_prefill(model, inputs["input_ids"], prefill_chunk)
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
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

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


def chunked_prefill(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int) -> Any:
    """Run all but the last prompt token through the model ``chunk`` tokens at a time; return the KV cache.

    Pass the cache to ``generate`` (argument ``cache_argument(model)``): it processes the last
    token and continues, with the same tokens as an unchunked ``generate``. Peak activation memory
    is that of one chunk (plus a ``[chunk, cached]`` attention mask) instead of the whole prompt.

    >>> from glmkit.loading import load_model
    >>> model = load_model(device_map="cpu")
    >>> ids = torch.arange(1, 40)[None]
    >>> cache = chunked_prefill(model, ids, chunk=16)
    >>> cache.get_seq_length()
    38
    """
    from transformers import DynamicCache

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}.")
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1] - 1, chunk):
            end = min(start + chunk, input_ids.shape[1] - 1)
            model(input_ids[:, start:end], use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return cache


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` in transformers >= 5.24, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
