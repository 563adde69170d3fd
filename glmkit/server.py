"""An OpenAI-compatible HTTP server for GLM-4 on your own cards: ``glmkit serve``.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream`` true or false,
server-sent events), with ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``usage`` and
``finish_reason``, and GLM-4 tool calling (``tools``/``tool_choice`` in, ``tool_calls`` out, parsed from
GLM-4's ``name\\n{arguments}`` format as the official GLM-4 server does). Requests from concurrent clients
are decoded together by ``glmkit.engine.Engine``. Bad input gets OpenAI-style error JSON with a 4xx status;
an out-of-memory error fails that request with a 500 error and the server keeps serving.
Introduced in ``notebooks/07_openai_server.ipynb``.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from typing import Any

try:  # FastAPI resolves the endpoints' annotations in this module's namespace
    from fastapi import Request
except ImportError as exc:  # pragma: no cover
    raise ImportError("glmkit.server needs the server extra: pip install 'glmkit[server]'") from exc

from glmkit.engine import Engine, GenerationRequest

ROLES = {"system", "user", "assistant", "tool", "observation"}
MAX_STOP = 4
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


def validate(body: Any, model_name: str, max_context: int) -> dict[str, Any]:
    """Check a chat-completions request; return normalized settings or raise ``ApiError`` (400/404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if body.get("model") not in (None, model_name):
        raise ApiError(404, f"The model '{body.get('model')}' does not exist; this server serves '{model_name}'.",
                       param="model", code="model_not_found")
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
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n} is not supported: this server returns one choice per request (n=1).", param="n")

    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = body.get(name, default)
        value = default if value is None else value
        bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
        if bad or value > hi or value < lo or (lo_open and value == lo):
            raise ApiError(400, f"'{name}' must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}.",
                           param=name)
        return float(value)

    temperature = number("temperature", 1.0, 0.0, 2.0)
    top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
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
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}.", param="seed")
    sampling = sampling_settings(body, number)
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and t["function"].get("name") for t in tools):
        raise ApiError(400, "'tools' must be a list of {type: 'function', function: {name, parameters}}.", param="tools")
    names = {t["function"]["name"] for t in tools}
    choice = body.get("tool_choice", "auto" if tools else "none")
    forced = None
    if isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name")
        if forced not in names:
            raise ApiError(400, f"tool_choice names '{forced}', which is not in 'tools'.", param="tool_choice")
    elif choice == "required":
        if len(names) != 1:
            raise ApiError(400, "tool_choice 'required' needs exactly one tool here; name it instead.", param="tool_choice")
        forced = next(iter(names))
    elif choice not in ("auto", "none"):
        raise ApiError(400, f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}.",
                       param="tool_choice")
    return {"messages": clean, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "seed": seed, **sampling, "tools": tools if choice != "none" else [], "forced_tool": forced,
            "stream": bool(body.get("stream", False)),
            "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False))}


def sampling_settings(body: dict[str, Any], number: Any) -> dict[str, Any]:
    """Penalties, ``logit_bias`` (token-id strings to a bias in [-100, 100]) and ``logprobs``/``top_logprobs``."""
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids (strings) to a bias in [-100, 100].", param="logit_bias")
    clean_bias = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if token < 0 or not ok or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' maps token ids to a bias in [-100, 100]; got {key!r}: {value!r}.",
                           param="logit_bias")
        clean_bias[token] = float(value)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, f"'logprobs' must be true or false, got {logprobs!r}.", param="logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
        raise ApiError(400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {top!r}.",
                       param="top_logprobs")
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return {"presence_penalty": number("presence_penalty", 0.0, -2.0, 2.0),
            "frequency_penalty": number("frequency_penalty", 0.0, -2.0, 2.0),
            "logit_bias": clean_bias or None, "logprobs": (top or 0) if logprobs else None}


def logprobs_content(tokenizer: Any, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> list[dict[str, Any]]:
    """OpenAI's ``choices[i].logprobs.content`` from an engine request's ``token_logprobs``."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [dict(one(t, lp), top_logprobs=[one(i, v) for i, v in top]) for t, lp, top in entries]


def create_app(engine: Engine, model_name: str = "glm-4-9b-chat", api_key: str | None = None) -> Any:
    """The FastAPI application around ``engine``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="glmkit OpenAI-compatible server")
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                               kind="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "max_batch_size": engine.max_batch_size,
                "max_context": engine.max_context, "batches_run": engine.batches_run}

    @app.get("/metrics")
    async def metrics() -> Any:
        from fastapi.responses import PlainTextResponse

        if engine.metrics is None:
            raise ApiError(404, "Metrics need prometheus-client: pip install 'glmkit[server]'.")
        return PlainTextResponse(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "glmkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        raw = await request.body()
        try:  # parsing and tokenizing a large prompt take a while: off the event loop, which keeps serving
            body = await asyncio.to_thread(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
        p = validate(body, model_name, engine.max_context)
        prefix = f"{p['forced_tool']}\n" if p["forced_tool"] else ""
        try:
            prompt = await asyncio.to_thread(engine.encode, p["messages"], p["tools"], assistant_prefix=prefix)
        except Exception as exc:  # the chat template rejected the conversation
            raise ApiError(400, f"The messages do not fit the GLM-4 chat template: {exc}.", param="messages") from None
        max_tokens = p["max_tokens"] or max(engine.max_context - len(prompt) - 1, 1)
        if len(prompt) + max_tokens > engine.max_context:
            raise ApiError(400, f"The prompt has {len(prompt)} tokens; with max_tokens {max_tokens} that exceeds the "
                           f"context of {engine.max_context} tokens. Shorten the messages or lower max_tokens.",
                           param="messages", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        # (text piece, tokens generated so far) from the engine thread; None when the request has finished
        pieces: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        settings = {k: p[k] for k in ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                                      "logit_bias", "logprobs")}
        on_text, box = None, []  # box: the request, once submit returned it
        if p["stream"]:
            def on_text(piece: str) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, (piece, len(box[0].tokens) if box else None))
        try:
            req = engine.submit(prompt, max_tokens=max_tokens, on_text=on_text,
                                on_done=lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None), **settings)
        except ValueError as exc:  # settings the engine cannot run (e.g. a token id outside the vocabulary)
            raise ApiError(400, str(exc)) from None
        box.append(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        tool_names = {t["function"]["name"] for t in p["tools"]}

        def finish(text: str) -> tuple[dict[str, Any], str]:
            call = parse_tool_call(prefix + text, tool_names) if tool_names else None
            if call:
                return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
            return {"role": "assistant", "content": text}, req.finish_reason or "stop"

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(req.tokens),
                    "total_tokens": len(prompt) + len(req.tokens)}

        def logprobs(upto: int | None = None, since: int = 0) -> dict[str, Any] | None:
            if p["logprobs"] is None:
                return None
            return {"content": logprobs_content(engine.tokenizer, req.token_logprobs[since:upto])}

        if not p["stream"]:
            # the body is read: the next ASGI message is the client hanging up (request.is_disconnected() misses it
            # behind an http middleware, which wraps receive)
            done, gone = asyncio.ensure_future(pieces.get()), asyncio.ensure_future(request.receive())
            try:
                await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not done.done():  # the client went away (or this handler was cancelled): stop generating for it
                    req.cancel()
                    done.cancel()
                gone.cancel()
            if not done.done() or done.cancelled():
                return None
            if req.error:
                raise ApiError(500, f"Generation failed: {req.error}. The server keeps serving; retry with a shorter "
                               "prompt or fewer tokens.", kind="server_error")
            message, reason = finish(req.text)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": message, "logprobs": await asyncio.to_thread(logprobs),
                                 "finish_reason": reason}], "usage": usage()}

        sent = 0  # tokens whose logprobs went out

        def chunk(delta: dict[str, Any], reason: str | None = None, upto: int | None = None) -> str:
            nonlocal sent
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            if p["logprobs"] is not None and upto is not None and upto > sent:
                choice["logprobs"] = logprobs(upto, sent)
                sent = upto
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> Any:
            try:
                yield chunk({"role": "assistant", "content": ""})
                streamed_text = not tool_names  # with tools, hold the text back until we know it is no call
                while (item := await pieces.get()) is not None:
                    if streamed_text:
                        yield chunk({"content": item[0]}, upto=item[1])
                if req.error:
                    err = ApiError(500, f"Generation failed: {req.error}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                else:
                    message, reason = finish(req.text)
                    if message.get("tool_calls"):
                        call = dict(message["tool_calls"][0], index=0)
                        yield chunk({"tool_calls": [call]})
                    elif not streamed_text:
                        yield chunk({"content": req.text})
                    yield chunk({}, reason, upto=len(req.token_logprobs))
                    if p["include_usage"]:
                        final = {"id": rid, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect: stop generating for this client
                req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class ServerThread:
    """Run the app with uvicorn in a background thread (notebooks, tests): ``start()``, ``url``, ``stop()``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
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


def default_batch_size(config: Any, max_context: int, dtype: Any = "bfloat16", quantization: str | None = None) -> int:
    """The largest batch (up to 64) the planner fits at ``max_context`` on the GPUs present (8 without GPUs)."""
    from glmkit.monitor import gpu_memory
    from glmkit.planning import plan_memory

    gpus = gpu_memory()
    if not gpus:
        return 8
    devices = {int(g.device.split(":")[1]): g.free for g in gpus}
    best = 1
    for b in (1, 2, 4, 8, 16, 32, 64):
        try:
            if plan_memory(config, devices, dtype=dtype, quantization=quantization, batch_size=b,
                           context_len=max_context).fits:
                best = b
        except ValueError:
            break
    return best


def serve(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str = "glm-4-9b-chat", max_batch_size: int = 8, max_context: int = 4096,
          fast_decode: bool = False) -> None:
    """Serve until interrupted (what ``glmkit serve`` runs)."""
    import uvicorn

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_context=max_context, fast_decode=fast_decode)
    uvicorn.run(create_app(engine, model_name, api_key), host=host, port=port, log_level="info")


__all__ = ["ApiError", "GenerationRequest", "ServerThread", "create_app", "default_batch_size", "parse_tool_call",
           "serve", "validate"]
