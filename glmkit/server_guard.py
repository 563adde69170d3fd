"""The API server's doors: who may call it (API key, Host, Origin) and what a request body may be (JSON, size, depth).

A keyless server on loopback is still reachable from every web page the user opens: a cross-origin ``text/plain``
POST needs no CORS preflight, and DNS rebinding points an attacker's name at 127.0.0.1 so the browser reads the
replies. So ``glmkit serve`` checks the ``Host`` header against ``allowed_hosts`` (loopback names by default;
any name with an API key beyond loopback), refuses an ``Origin`` that is not in ``allowed_origins``, requires
``Content-Type: application/json`` on JSON endpoints, bounds the body's size and nesting depth, compares the API
key in constant time, and refuses to listen beyond loopback without a key unless told ``--allow-unauthenticated``. Introduced in
``notebooks/07_openai_server.ipynb``.

>>> default_allowed_hosts("127.0.0.1")
['localhost', '127.0.0.1', '::1']
>>> host_allowed("localhost:8000", ["localhost", "127.0.0.1", "::1"]), host_allowed("evil.example:8000", ["localhost"])
(True, False)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]
MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: a 128K-token prompt is about 0.5 MB of text
MAX_JSON_DEPTH = 32  # a chat request with tools nests about 8 deep


class GuardError(Exception):
    """A refused request: HTTP status, the message (names the fix), OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> str | None:
    """Refuse to listen beyond loopback without an API key; return a loud warning when told to anyway.

    >>> check_exposure("127.0.0.1", None) is None
    True
    >>> check_exposure("0.0.0.0", None)
    Traceback (most recent call last):
    ...
    ValueError: --host 0.0.0.0 is reachable from other machines, and no API key is set: anyone who can reach it can \
use your GPUs. Give --api-key KEY (or set GLMKIT_API_KEY), or pass --allow-unauthenticated if the network is yours.
    """
    if is_loopback(host) or api_key:
        return None
    if not allow_unauthenticated:
        raise ValueError(f"--host {host} is reachable from other machines, and no API key is set: anyone who can "
                         "reach it can use your GPUs. Give --api-key KEY (or set GLMKIT_API_KEY), or pass "
                         "--allow-unauthenticated if the network is yours.")
    return (f"WARNING: glmkit serve listens on {host} WITHOUT an API key (--allow-unauthenticated): anyone who can "
            "reach this port can run the model. Prefer --api-key, or a reverse proxy that authenticates. Clients "
            "must use a name given to --allowed-hosts (default: loopback names and the address bound).")


def default_allowed_hosts(host: str, api_key: str | None = None) -> list[str]:
    """``Host`` header names served by default: the loopback names on loopback; any (``*``) elsewhere with an API
    key; without one, the loopback names and the address bound (``--allowed-hosts`` adds the names clients use).

    >>> default_allowed_hosts("0.0.0.0", api_key="k"), default_allowed_hosts("192.168.1.5")
    (['*'], ['localhost', '127.0.0.1', '::1', '192.168.1.5'])
    """
    if is_loopback(host):
        return list(LOOPBACK_NAMES)
    if api_key:
        return ["*"]
    wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
    return [*LOOPBACK_NAMES, *([] if wildcard else [host.strip("[]")])]


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` header (port ignored) is in ``allowed`` (``*`` allows any, ``.x.org`` a domain)."""
    if "*" in allowed:
        return True
    name = _host_name(header or "")
    return any(name == a.lower() or (a.startswith(".") and name.endswith(a.lower())) for a in allowed)


def origin_allowed(origin: str | None, allowed: Sequence[str], host_header: str | None, scheme: str = "http") -> bool:
    """No ``Origin`` (not a browser), the server's own origin, or one in ``allowed`` (``*`` allows any)."""
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    return "*" in allowed or origin in {a.rstrip("/").lower() for a in allowed} or \
        origin == f"{scheme}://{(host_header or '').lower()}"


def key_matches(authorization: str | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` compared in constant time (no timing hint about the key)."""
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {api_key}".encode())


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[1]`` is 1), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json_body(raw: bytes, content_type: str | None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request body as JSON, or a ``GuardError`` that says what is wrong with it (415, 400)."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise GuardError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}: send the body "
                         "as JSON (the openai client and `curl -H 'Content-Type: application/json'` do).")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise GuardError(400, f"The JSON body is nested too deeply: this server accepts at most {max_depth} "
                         "levels.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GuardError(400, f"The request body is not valid JSON: {exc}.") from None
    if json_depth(body) > max_depth:
        raise GuardError(400, f"The JSON body is nested {json_depth(body)} levels deep: this server accepts at most "
                         f"{max_depth} levels.")
    return body


async def read_body(request: Any, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The raw body of a Starlette request, refused with 413 once it passes ``max_bytes``."""
    too_big = GuardError(413, f"The request body is larger than {max_bytes / 2**20:g} MiB, this server's limit: "
                         "send a shorter prompt.", code="request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def check_request(headers: Any, path: str, method: str, scheme: str, api_key: str | None,
                  allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> None:
    """Host, Origin and API key checks for one request; raises ``GuardError`` (400, 403, 401)."""
    host = headers.get("host")
    if not host_allowed(host, allowed_hosts):
        raise GuardError(400, f"The Host header {host!r} is not allowed on this server: start it with "
                         f"--allowed-hosts {_host_name(host or '') or 'NAME'} to serve that name.", code="invalid_host")
    origin = headers.get("origin")
    if not origin_allowed(origin, allowed_origins, host, scheme):
        raise GuardError(403, f"Requests from web pages at {origin} are not allowed: start the server with "
                         f"--allowed-origins {origin} to let that page call it.", kind="permission_error",
                         code="origin_not_allowed")
    preflight = method == "OPTIONS" and "access-control-request-method" in headers
    if api_key and path.startswith("/v1/") and not preflight and not key_matches(headers.get("authorization"), api_key):
        raise GuardError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                         kind="authentication_error", code="invalid_api_key")


__all__ = ["GuardError", "LOOPBACK_NAMES", "MAX_BODY_BYTES", "MAX_JSON_DEPTH", "check_exposure", "check_request",
           "default_allowed_hosts", "host_allowed", "is_loopback", "json_depth", "key_matches", "origin_allowed",
           "parse_json_body", "read_body"]
