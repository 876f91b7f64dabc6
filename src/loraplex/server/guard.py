"""RequestGuard: what every HTTP request passes before any route reads its body (an ASGI middleware).

In order: the Host header names this server (a web page cannot reach a loopback server through DNS rebinding);
the API key is valid (an unauthenticated client never gets its body parsed); the body stays under
--max-body-size, from Content-Length and while it is read (chunked bodies too); and it arrives within
--body-timeout seconds. Each refusal is a JSON error that names its cause. The routes check the key's scope again
(what it may use); this only keeps unauthenticated and oversized work off the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from loraplex.config import is_loopback
from loraplex.server.auth import Authenticator
from loraplex.server.errors import APIError, error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: a 128k-token prompt as text is ~0.5 MiB, as token ids ~1 MiB
# No key: the liveness probe, the dashboard page (it asks for one), the API's schema pages.
PUBLIC_PATHS = ("/health", "/ping", "/version", "/dashboard", "/docs", "/redoc", "/openapi.json")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    allowed_hosts: frozenset[str] | None = None  # Host names answered to (lower case, no port); None = any
    max_body_size: int = DEFAULT_MAX_BODY  # bytes; more is a 413
    body_timeout: float = 30.0  # seconds for the whole body to arrive; slower is a 408


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers to: its own address (and the loopback names if it is
    loopback), plus `extra` (--allowed-hosts). A wildcard bind (0.0.0.0, ::) has no names of its own: any Host,
    unless --allowed-hosts names them ('*' in `extra`: any Host, whatever the bind)."""
    extra = {h.strip().lower() for h in extra if h.strip()}
    if "*" in extra:
        return None
    host = bind.strip("[]").lower()
    if host in ("0.0.0.0", "::", ""):
        return frozenset(extra) or None
    names = {host} | extra
    if is_loopback(host):
        names |= set(LOOPBACK_NAMES)
    return frozenset(names)


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'a.b:8000' -> 'a.b', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class RequestGuard:
    def __init__(self, app: ASGIApp, config: GuardConfig, auth: Authenticator) -> None:
        self.app, self.config, self.auth = app, config, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _respond(send, refusal)
        await self.app(scope, self._bounded(receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        hosts = self.config.allowed_hosts
        if hosts is not None and host_name(headers.get("host", "")) not in hosts:
            return APIError(400, f"Host header {headers.get('host', '')!r} is not a name this server answers to "
                            "(start it with --allowed-hosts NAME to add one)", "invalid_host")
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")  # behind --root-path the server prepends it to every path
        if root and path.startswith(root):
            path = path[len(root):]
        if not any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS):
            try:
                self.auth.scope_of(headers.get("authorization", ""))
            except APIError as e:
                return e
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, f"Content-Length {length!r} is not a number", "invalid_content_length")
            if int(length) > self.config.max_body_size:
                return _too_large(self.config.max_body_size)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        """`receive`, counting body bytes (413 past the cap) and timing the body (408 past --body-timeout)."""
        cap, timeout = self.config.max_body_size, self.config.body_timeout
        loop = asyncio.get_running_loop()
        deadline, read, done = loop.time() + timeout, 0, False

        async def bounded() -> Message:
            nonlocal read, done
            if done:  # the body is in: what follows is the disconnect a streaming response waits for
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {timeout:g} s") from None
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > cap:
                    raise HTTPException(413, _too_large(cap).message)
                done = not message.get("more_body", False)
            return message

        return bounded


def _too_large(cap: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {cap} bytes (--max-body-size)",
                    "request_too_large")


async def _respond(send: Send, e: APIError) -> None:
    body = json.dumps(error_body(e.status, e.message, e.code, e.param, e.type)).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
