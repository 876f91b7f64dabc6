"""A deadline on request headers (slowloris): uvicorn waits forever for a request line and headers, so a client
that opens connections and sends nothing, or drips a header a byte at a time, holds a --limit-concurrency place
per connection until every other client gets 503s. This protocol (uvicorn's httptools one, plus a timer) gives
each request `header_timeout` seconds from the connection opening, or from its first byte on a kept-alive
connection, to its last header; later, the client gets a 408 naming the flag and the connection is closed.

The body has its own deadline (server/guard.py, --body-timeout); idle kept-alive connections have uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _response(seconds: float) -> bytes:
    msg = (f"request headers did not arrive within {seconds:g} s (--header-timeout); the connection is "
           "closed").encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n" + msg)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0  # set per server by with_header_timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(_response(self.header_timeout))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is held no longer than one that drips

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's deadline."""
    return type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": seconds})
