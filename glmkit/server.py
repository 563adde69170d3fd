"""An OpenAI-compatible HTTP server for GLM-4 on your own cards: ``glmkit serve``.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and the
legacy ``POST /v1/completions`` (``stream`` true or false, server-sent events), with ``temperature``, ``top_p``,
``max_tokens``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs``/
``top_logprobs`` (chat), ``usage`` and ``finish_reason``, and GLM-4 tool calling (``tools``/
``tool_choice`` in, ``tool_calls`` out, parsed from GLM-4's ``name\\n{arguments}`` format as the official GLM-4
server does; streamed text goes out as it comes, a tool call once complete). One model answers to several names
(``glm-4``, ``glm-4-9b-chat`` and the checkpoint's folder by default, as vLLM's ``--served-model-name``).
Requests from concurrent clients are decoded together by ``glmkit.engine.Engine`` (continuous batching with
``fast_decode``); ``GET /metrics`` shows its Prometheus metrics. A client that disconnects, streaming or not, stops
its generation; parsing and tokenizing run off the event loop, so a huge prompt does not stall the other clients.
Bad input gets OpenAI-style error JSON with a 4xx status; an out-of-memory error fails that request with a 500
error and the server keeps serving. ``glmkit.server_guard`` keeps the doors: API key, Host, Origin, JSON content
type, body size and depth.
Introduced in ``notebooks/07_openai_server.ipynb``.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # FastAPI resolves the endpoints' annotations in this module's namespace
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover
    raise ImportError("glmkit.server needs the server extra: pip install 'glmkit[server]'") from exc

import torch.distributed as dist

from glmkit import parallel
from glmkit.engine import Engine, GenerationRequest
from glmkit.monitor import gpu_memory
from glmkit.planning import plan_memory
from glmkit.server_guard import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    GuardError,
    check_exposure,
    check_request,
    default_allowed_hosts,
    parse_json_body,
    read_body,
)
from glmkit.tp_decode import TPLeader, follow

ROLES = {"system", "user", "assistant", "tool", "observation"}
MAX_STOP = 4
DEFAULT_MODEL_NAMES = ("glm-4", "glm-4-9b-chat")  # the official GLM-4 demo asks for "glm-4"
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as vLLM accepts
LEGACY_MAX_TOKENS = 16  # /v1/completions' default in OpenAI's API
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def served_model_names(model_path: str | Path | None = None, names: Sequence[str] | None = None) -> list[str]:
    """The names clients may ask for: ``names`` if given, else ``glm-4``, ``glm-4-9b-chat`` and the folder's name.

    >>> served_model_names("/models/GLM-4-9B-Chat-HF")
    ['glm-4', 'glm-4-9b-chat', 'GLM-4-9B-Chat-HF']
    >>> served_model_names(names=["my-glm"])
    ['my-glm']
    """
    if names:
        return list(dict.fromkeys(names))
    folder = [Path(model_path).name] if model_path else []
    return list(dict.fromkeys([*DEFAULT_MODEL_NAMES, *folder]))


def parse_tool_call(text: str, tool_names: set[str]) -> dict[str, Any] | None:
    """GLM-4 calls a tool by answering ``name\\n{json arguments}``; return an OpenAI ``tool_calls`` entry or None.

    >>> parse_tool_call('get_weather\\n{"city": "Paris"}', {"get_weather"})["function"]
    {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}
    >>> parse_tool_call("The weather is fine.", {"get_weather"}) is None
    True
    """
    name, sep, arguments = text.strip().partition("\n")
    if not sep or name.strip() not in tool_names:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name.strip(), "arguments": arguments.strip()}}


class ToolCallSplitter:
    """Streams a reply that may be a GLM-4 tool call: text goes out as it comes, a call is held until complete.

    GLM-4 writes a call as a tool's name on the first line, then the JSON arguments; an answer in words starts
    with anything else. So text is held only while the first line could still be a tool's name.

    >>> s = ToolCallSplitter({"get_weather"})
    >>> [s.feed(p) for p in ["get_", "weather\\n", '{"city": "Paris"}']], s.call()["function"]["name"]
    (['', '', ''], 'get_weather')
    >>> s = ToolCallSplitter({"get_weather"})
    >>> [s.feed(p) for p in ["get", " it", " from the sky."]], s.call() is None, s.rest()
    (['', 'get it', ' from the sky.'], True, '')
    """

    def __init__(self, tool_names: set[str], prefix: str = "") -> None:
        self.names, self.prefix, self.held = tool_names, prefix, ""
        self.mode = "call" if prefix else "undecided"  # "undecided", "call" or "text"

    def feed(self, piece: str) -> str:
        """Take the next piece of generated text; return what can be streamed now as content."""
        if self.mode == "text":
            return piece
        self.held += piece
        if self.mode == "call":
            return ""
        first, newline, _ = self.held.lstrip().partition("\n")
        if newline and first.strip() in self.names:
            self.mode = "call"
            return ""
        if not newline and any(n.startswith(first.strip()) for n in self.names):
            return ""  # may still become a tool's name
        self.mode, out, self.held = "text", self.held, ""
        return out

    def call(self) -> dict[str, Any] | None:
        """At the end: the tool call, if the reply was one."""
        return parse_tool_call(self.prefix + self.held, self.names) if self.mode != "text" else None

    def rest(self) -> str:
        """At the end, when the reply was no call: the text still held back."""
        return "" if self.mode == "text" else self.held


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts.", param="messages")


def check_model(body: dict[str, Any], model_names: Sequence[str]) -> str:
    """The served name the request asks for (the first one when it names none), or a 404."""
    model = body.get("model")
    if model is None:
        return model_names[0]
    if model not in model_names:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in model_names)}.", param="model", code="model_not_found")
    return model


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    if bad or value > hi or value < lo or (lo_open and value == lo):
        raise ApiError(400, f"'{name}' must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}.",
                       param=name)
    return float(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}.", param=name)
    return bool(value)


def _sampling(body: dict[str, Any], max_context: int, default_max_tokens: int | None = None) -> dict[str, Any]:
    """Settings shared by both endpoints: n, sampling, max_tokens, stop, seed, stream and its options."""
    n = body.get("n")
    if n not in (None, 1) or isinstance(n, bool):
        raise ApiError(400, f"n={n} is not supported: this server returns one choice per request (n=1).", param="n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}.", param="max_tokens")
    if max_tokens is not None and max_tokens >= max_context:
        raise ApiError(400, f"'max_tokens' {max_tokens} is beyond this server's context of {max_context} tokens.",
                       param="max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings.", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or
                             not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ApiError(400, f"'seed' must be an integer in [-2**63, 2**63-1], got {seed!r}.", param="seed")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or
                                not isinstance(options.get("include_usage", False), (bool, type(None)))):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}, got "
                       f"{options!r}.", param="stream_options")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true.", param="stream_options")
    return {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens or default_max_tokens,
            "stop": stop, "seed": seed, "stream": stream, "include_usage": bool((options or {}).get("include_usage")),
            "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            "logit_bias": _logit_bias(body)}


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as strings) to a bias in [-100, 100] added to their logits."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids (strings) to a bias in [-100, 100].", param="logit_bias")
    clean = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else -1
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if token < 0 or not ok or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' maps token ids to a bias in [-100, 100]; got {key!r}: {value!r}.",
                           param="logit_bias")
        clean[token] = float(value)
    return clean or None


def _logprobs(body: dict[str, Any]) -> int | None:
    """Chat ``logprobs`` (true/false) and ``top_logprobs`` (0..20): None for none, else how many alternatives."""
    wanted, top = _flag(body, "logprobs"), body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
        raise ApiError(400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {top!r}.",
                       param="top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs \"logprobs\": true.", param="top_logprobs")
    return (top or 0) if wanted else None


def logprobs_content(tokenizer: Any, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict[str, Any]]:
    """OpenAI's ``choices[i].logprobs.content`` from a request's ``token_logprobs``."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [dict(one(t, lp), top_logprobs=[one(i, v) for i, v in top]) for t, lp, top in entries]


def _response_format(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        raise ApiError(400, f"response_format {kind!r} is not supported: this server does not constrain decoding "
                       "to JSON. Ask for JSON in the prompt and parse the reply, or serve with vLLM "
                       "(`glmkit plan ... --for vllm`), which does.", param="response_format")
    raise ApiError(400, f"'response_format' must be {{\"type\": \"text\"}}, got {fmt!r}.", param="response_format")


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, bool]:
    """``tools`` and ``tool_choice``: the tools the prompt shows, the one forced by name (or None), and whether
    the reply must be a call (``required``)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "'tools' must be a list of {type: 'function', function: {name, parameters}}.", param="tools")
    names = [t["function"]["name"] for t in tools]
    choice = body.get("tool_choice")
    choice = ("auto" if tools else "none") if choice is None else choice
    if isinstance(choice, dict):
        function = choice.get("function")
        forced = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(forced, str):
            raise ApiError(400, "tool_choice must look like {\"type\": \"function\", \"function\": {\"name\": "
                           f"\"NAME\"}}}}, got {choice!r}.", param="tool_choice")
        if forced not in names:
            raise ApiError(400, f"tool_choice names '{forced}', which is not in 'tools'.", param="tool_choice")
        return tools, forced, True
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs at least one tool in 'tools'.", param="tool_choice")
        return tools, names[0] if len(names) == 1 else None, True
    if choice == "auto":
        return tools, None, False
    if choice == "none":
        return [], None, False
    raise ApiError(400, f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}.",
                   param="tool_choice")


def validate(body: Any, model_names: str | Sequence[str], max_context: int) -> dict[str, Any]:
    """Check a chat-completions request; return normalized settings or raise ``ApiError`` (400/404)."""
    names = [model_names] if isinstance(model_names, str) else list(model_names)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = check_model(body, names)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'.", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role '{role}' is not one of {', '.join(sorted(ROLES))}.", param="messages")
        text = _content_text(m.get("content"), i)
        if not text and not m.get("tool_calls"):
            raise ApiError(400, f"messages[{i}] is empty: give it some content.", param="messages")
        clean.append({**{k: v for k, v in m.items() if k in ("role", "tool_calls", "name")}, "content": text})
    if clean[-1]["role"] == "assistant":
        raise ApiError(400, "The last message is from the assistant: end with a user or tool message.", param="messages")
    _response_format(body)
    tools, forced, required = _tools(body)
    return {"model": model, "messages": clean, **_sampling(body, max_context), "logprobs": _logprobs(body),
            "tools": tools, "forced_tool": forced, "required": required}


def validate_completion(body: Any, model_names: Sequence[str], max_context: int, vocab_size: int) -> dict[str, Any]:
    """Check a legacy completions request (``prompt`` in, text out); raise ``ApiError`` (400/404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = check_model(body, list(model_names))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    ids_ok = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids_ok:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request).",
                       param="prompt")
    if ids_ok and not all(0 <= t < vocab_size for t in prompt):
        raise ApiError(400, f"'prompt' has token ids outside this model's vocabulary [0, {vocab_size}).",
                       param="prompt")
    for name, allowed in (("suffix", (None, "")), ("best_of", (None, 1)), ("logprobs", (None,))):
        if body.get(name) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server's /v1/completions (got "
                           f"{body.get(name)!r}).", param=name)
    return {"model": model, "prompt": prompt, "echo": _flag(body, "echo"),
            **_sampling(body, max_context, LEGACY_MAX_TOKENS)}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


SETTINGS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias")


class Pieces:
    """A request's text as it comes, on the event loop: ``get()`` gives (piece, tokens generated by then), then None
    once the request has finished. Fed from the engine thread; without ``stream`` only the end arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.req: GenerationRequest | None = None

    def text(self, piece: str) -> None:  # engine thread
        count = len(self.req.tokens) if self.req is not None else None
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (piece, count))

    def done(self, _: GenerationRequest) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    async def get(self) -> tuple[str, int | None] | None:
        return await self.queue.get()


def _start(engine: Engine, prompt: list[int], stream: bool = True, **kwargs: Any) -> tuple[GenerationRequest, Pieces]:
    """Submit ``prompt`` (no thread per request: the engine calls back); a 400 for settings it cannot run."""
    pieces = Pieces(asyncio.get_running_loop())
    try:
        req = engine.submit(prompt, on_text=pieces.text if stream else None, on_done=pieces.done, **kwargs)
    except ValueError as exc:  # e.g. a logit_bias token id outside the vocabulary
        raise ApiError(400, str(exc)) from None
    pieces.req = req
    return req, pieces


async def _finished(req: GenerationRequest, pieces: Pieces, request: Request | None = None) -> GenerationRequest:
    """Wait for all of ``req``; a 500 if generation failed. With ``request``: a client that hangs up cancels it
    (watched on the ASGI receive channel: ``request.is_disconnected()`` misses it behind an http middleware)."""
    while True:  # the pieces of a streamed request, if any, are not needed here
        done = asyncio.ensure_future(pieces.get())
        gone = asyncio.ensure_future(request.receive()) if request is not None else None
        try:
            await asyncio.wait({done} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():  # the client went away (or this handler was cancelled): stop generating for it
                req.cancel()
                done.cancel()
            if gone is not None:
                gone.cancel()
        if not done.done() or done.cancelled():
            raise ApiError(499, "The client closed the request.", code="client_closed_request")
        if done.result() is None:
            break
    if req.error:
        raise ApiError(500, f"Generation failed: {req.error}. The server keeps serving; retry with a shorter "
                       "prompt or fewer tokens.", kind="server_error")
    return req


def _budget(engine: Engine, prompt: list[int], max_tokens: int | None) -> int:
    """``max_tokens`` (default: the rest of the context), or a 400 when prompt + max_tokens do not fit."""
    max_tokens = max_tokens or max(engine.max_context - len(prompt) - 1, 1)
    if len(prompt) + max_tokens > engine.max_context:
        raise ApiError(400, f"The prompt has {len(prompt)} tokens; with max_tokens {max_tokens} that exceeds the "
                       f"context of {engine.max_context} tokens. Shorten the prompt or lower max_tokens.",
                       param="messages", code="context_length_exceeded")
    return max_tokens


async def _encode(engine: Engine, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                  prefix: str = "") -> list[int]:
    try:  # the chat template and the tokenizer take a while on a long prompt: off the event loop
        return await asyncio.to_thread(engine.encode, messages, tools, assistant_prefix=prefix)
    except Exception as exc:  # the chat template rejected the conversation
        raise ApiError(400, f"The messages do not fit the GLM-4 chat template: {exc}.", param="messages") from None


async def _pick_tool(engine: Engine, prompt: list[int], p: dict[str, Any]) -> str:
    """``tool_choice: "required"`` with several tools: let the model write the name line, as it does when it
    calls a tool on its own; the first tool when that line names none (GLM-4 answered in words)."""
    names = [t["function"]["name"] for t in p["tools"]]
    longest = max(len(engine.tokenizer(n, add_special_tokens=False).input_ids) for n in names)
    req, pieces = _start(engine, prompt, False, max_tokens=_budget(engine, prompt, min(longest + 2, engine.max_context - 1)),
                         temperature=p["temperature"], top_p=p["top_p"], stop=["\n"], seed=p["seed"])
    first = (await _finished(req, pieces)).text.strip()
    return first if first in names else names[0]


def create_app(engine: Engine, model_name: str | Sequence[str] = DEFAULT_MODEL_NAMES, api_key: str | None = None,
               allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, max_json_depth: int = MAX_JSON_DEPTH) -> Any:
    """The FastAPI application around ``engine``.

    Args:
        model_name: the name, or names, clients may ask for; responses echo the one asked for.
        api_key: require ``Authorization: Bearer KEY`` on ``/v1/`` (compared in constant time).
        allowed_hosts: ``Host`` header names served (default: the loopback names; ``*`` for any).
        allowed_origins: web page origins allowed to call the server (default: none; ``*`` for any).
        max_body_bytes, max_json_depth: request body limits (4 MiB, 32 levels).
    """
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    hosts = list(allowed_hosts) if allowed_hosts else default_allowed_hosts("127.0.0.1")
    origins = list(allowed_origins)
    app = FastAPI(title="glmkit OpenAI-compatible server")
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (f"There is no {request.url.path} on this server: it serves /v1/models, /v1/chat/completions, "
                       "/v1/completions, /health and /metrics.")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: use {exc.headers.get('Allow', 'POST')}."
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, message, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        err = ApiError(500, f"Internal error: {type(exc).__name__}: {exc}. The server keeps serving.",
                       kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        try:
            check_request(request.headers, request.url.path, request.method, request.url.scheme, api_key, hosts,
                          origins)
        except GuardError as exc:
            return JSONResponse(ApiError(exc.status, exc.message, exc.kind, code=exc.code).body(),
                                status_code=exc.status)
        return await call_next(request)

    if origins:  # added last, so outermost: answers the browsers' preflight requests and adds CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    async def read_json(request: Request) -> Any:
        try:
            body = await read_body(request, max_body_bytes)  # parsed off the event loop (a few MB take a while)
            return await asyncio.to_thread(parse_json_body, body, request.headers.get("content-type"), max_json_depth)
        except GuardError as exc:
            raise ApiError(exc.status, exc.message, exc.kind, code=exc.code) from None

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "glmkit", "root": names[0],
                "max_model_len": engine.max_context}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": names[0], "models": names, "max_batch_size": engine.max_batch_size,
                "max_context": engine.max_context, "batches_run": engine.batches_run}

    @app.get("/metrics")
    async def metrics() -> Any:
        if engine.metrics is None:
            raise ApiError(404, "Metrics need prometheus-client: pip install 'glmkit[server]'.")
        return PlainTextResponse(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model({"model": model_id}, names)
        return card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        p = validate(await read_json(request), names, engine.max_context)
        base = await _encode(engine, p["messages"], p["tools"])
        forced = p["forced_tool"] or (await _pick_tool(engine, base, p) if p["required"] else None)
        prefix = f"{forced}\n" if forced else ""
        prompt = await _encode(engine, p["messages"], p["tools"], prefix) if prefix else base
        req, pieces = _start(engine, prompt, p["stream"], max_tokens=_budget(engine, prompt, p["max_tokens"]),
                             logprobs=p["logprobs"], **{k: p[k] for k in SETTINGS})
        rid, now, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), p["model"]
        splitter = ToolCallSplitter({t["function"]["name"] for t in p["tools"]}, prefix) if p["tools"] else None

        def usage() -> dict[str, int]:  # a forced tool's name line counts as completion, not prompt
            completion = max(len(prompt) - len(base), 0) + len(req.tokens)
            return {"prompt_tokens": len(base), "completion_tokens": completion,
                    "total_tokens": len(base) + completion}

        def logprobs(since: int = 0, upto: int | None = None) -> dict[str, Any] | None:
            if p["logprobs"] is None:
                return None
            return {"content": logprobs_content(engine.tokenizer, req.token_logprobs[since:upto])}

        if not p["stream"]:
            await _finished(req, pieces, request)
            call = parse_tool_call(prefix + req.text, splitter.names) if splitter else None
            message = ({"role": "assistant", "content": None, "tool_calls": [call]} if call else
                       {"role": "assistant", "content": req.text})
            reason = "tool_calls" if call else req.finish_reason or "stop"
            return {"id": rid, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": message, "logprobs": await asyncio.to_thread(logprobs),
                                 "finish_reason": reason}], "usage": usage()}

        sent = 0  # tokens whose logprobs went out

        def chunk(delta: dict[str, Any], reason: str | None = None, upto: int | None = None) -> str:
            nonlocal sent
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            if p["logprobs"] is not None and upto is not None and upto > sent:  # the tokens up to this piece
                choice["logprobs"], sent = logprobs(sent, upto), upto
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                         "choices": [choice]})

        async def events() -> Any:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (item := await pieces.get()) is not None:
                    if text := (splitter.feed(item[0]) if splitter else item[0]):
                        yield chunk({"content": text}, upto=item[1])
                if req.error:
                    yield _sse(ApiError(500, f"Generation failed: {req.error}", kind="server_error").body())
                else:
                    call = splitter.call() if splitter else None
                    if call:
                        yield chunk({"tool_calls": [dict(call, index=0)]})
                    elif splitter and splitter.rest():
                        yield chunk({"content": splitter.rest()})
                    yield chunk({}, "tool_calls" if call else req.finish_reason or "stop", upto=len(req.token_logprobs))
                    if p["include_usage"]:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                                    "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect: stop generating for this client
                req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        vocab = int(getattr(engine.model.config, "vocab_size", 0) or len(engine.tokenizer))
        p = validate_completion(await read_json(request), names, engine.max_context, vocab)
        if isinstance(p["prompt"], str):  # tokenizing a long prompt takes a while: off the event loop
            prompt, prompt_text = (await asyncio.to_thread(engine.tokenizer, p["prompt"])).input_ids, p["prompt"]
        else:
            prompt, prompt_text = p["prompt"], await asyncio.to_thread(engine.tokenizer.decode, p["prompt"])
        req, pieces = _start(engine, prompt, p["stream"], max_tokens=_budget(engine, prompt, p["max_tokens"]),
                             **{k: p[k] for k in SETTINGS})
        rid, now, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), p["model"]
        echo = prompt_text if p["echo"] else ""

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(req.tokens),
                    "total_tokens": len(prompt) + len(req.tokens)}

        def body(text: str, reason: str | None, **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}], **extra}

        if not p["stream"]:
            await _finished(req, pieces, request)
            return body(echo + req.text, req.finish_reason or "stop", usage=usage())

        async def events() -> Any:
            try:
                if echo:
                    yield _sse(body(echo, None))
                while (item := await pieces.get()) is not None:
                    yield _sse(body(item[0], None))
                if req.error:
                    yield _sse(ApiError(500, f"Generation failed: {req.error}", kind="server_error").body())
                else:
                    yield _sse(body("", req.finish_reason or "stop"))
                    if p["include_usage"]:
                        yield _sse({**body("", None), "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# Idle keep-alive connections stay open this long. Longer than clients keep theirs (httpx, under the openai client:
# 5 s), so a client always drops an idle connection first: with uvicorn's default, also 5 s, a request could go out
# on a connection the server was closing at that moment and fail with a connection error.
KEEP_ALIVE_S = 75


class ServerThread:
    """Run the app with uvicorn in a background thread (notebooks, tests): ``start()``, ``url``, ``stop()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn  # the server extra's web server: imported only when an app is run

        self.host, self.port = host, port or parallel.free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=self.server.run, name="glmkit-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30) -> ServerThread:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def default_batch_size(config: Any, max_context: int, dtype: Any = "bfloat16", quantization: str | None = None,
                       fast_decode: bool = False, gpus_used: int | None = None) -> int:
    """The largest batch (up to 64) the planner fits at ``max_context`` on the GPUs present, or on the first
    ``gpus_used`` of them (8 without GPUs); ``fast_decode``: planned for ``FastDecoder``'s static cache and buffers,
    as ``serve(fast_decode=True)`` runs."""
    gpus = gpu_memory()[:gpus_used]
    if not gpus:
        return 8
    devices = {int(g.device.split(":")[1]): g.free for g in gpus}
    best = 1
    for b in (1, 2, 4, 8, 16, 32, 64):
        try:
            if plan_memory(config, devices, dtype=dtype, quantization=quantization, batch_size=b,
                           context_len=max_context, fast_decode=fast_decode).fits:
                best = b
        except ValueError:
            break
    return best


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # uvicorn re-raises the signal it caught once it has shut down: end as after Ctrl-C


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | Sequence[str] = DEFAULT_MODEL_NAMES, max_batch_size: int = 8, max_context: int = 4096,
          fast_decode: bool = False, allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
          allow_unauthenticated: bool = False, decoder: Any = None) -> None:
    """Serve until interrupted (what ``glmkit serve`` runs); refuses a non-loopback ``host`` without ``api_key``
    unless ``allow_unauthenticated`` (see ``glmkit.server_guard``). ``decoder``: as ``Engine``'s (``serve_tp``)."""
    import uvicorn

    warning = check_exposure(host, api_key, allow_unauthenticated)
    if warning:
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_context=max_context, fast_decode=fast_decode,
                    decoder=decoder)
    app = create_app(engine, model_name, api_key, allowed_hosts or default_allowed_hosts(host, api_key),
                     allowed_origins)
    main = threading.current_thread() is threading.main_thread()  # (signal handlers live on the main thread)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main else None
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=KEEP_ALIVE_S)
    except KeyboardInterrupt:
        pass  # SIGINT or SIGTERM, after uvicorn's graceful shutdown: exit 0
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        engine.close()  # the engine thread stops before anything it drives is released




def serve_tp(model: Any, tokenizer: Any, max_batch_size: int = 8, max_context: int = 4096, **kwargs: Any) -> None:
    """``serve`` for one of the torchrun processes of ``glmkit serve --tp N``, every layer split over them
    (``TPDecoder``): rank 0 answers HTTP and runs the engine, whose every decoder call goes first to the other ranks
    (``TPLeader``); they run each one on their shards (``follow``) until rank 0 shuts down and releases them.
    ``model`` is the whole model on the CPU: each rank copies its slices to its GPU, then the model's weights are
    dropped (moved to the meta device; its config stays). Rank 0's batch size wins.
    ``kwargs``: as ``serve``. Introduced in ``notebooks/08_tensor_parallel.ipynb``.

    The engine drives any decoder with the fast decoder's contract, here one process's whole ``TPDecoder``:

    >>> from glmkit.loading import load_model, load_tokenizer
    >>> from glmkit.tp_decode import TPDecoder
    >>> model = load_model(device_map="cpu")
    >>> engine = Engine(model, load_tokenizer(), max_batch_size=2, max_context=64,
    ...                 decoder=TPDecoder(model, max_len=65, batch_size=2))
    >>> len(engine.submit([5, 17, 33], max_tokens=4, logit_bias={832: -100, 839: -100, 841: -100}).wait().tokens)
    4
    >>> engine.close()
    """
    parallel.init_process_group()
    commands = parallel.command_group()  # gloo, host objects, no timeout (an idle server sends nothing)
    box = [max_batch_size]
    dist.broadcast_object_list(box, src=0, group=commands)
    decoder = parallel.tp_decoder(model, max_context + 1, box[0])
    model.to("meta")  # the decoder holds copies of this rank's slices: give back the whole model's host memory
    if parallel.rank() != 0:  # a follower leaves when rank 0 says stop, or when rank 0's connection drops
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            follow(decoder, commands)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return
    leader = TPLeader(decoder, commands)
    try:
        serve(model, tokenizer, max_batch_size=box[0], max_context=max_context, decoder=leader, **kwargs)
    finally:
        leader.close()  # (serve has stopped the engine, the leader's only caller)


__all__ = ["DEFAULT_MODEL_NAMES", "ApiError", "GenerationRequest", "ServerThread", "ToolCallSplitter", "create_app",
           "default_batch_size", "logprobs_content", "parse_tool_call", "serve", "serve_tp", "served_model_names", "validate",
           "validate_completion"]
