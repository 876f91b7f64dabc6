"""Per-tenant caps at the door (issue 29): requests in flight, requests per minute and tokens per minute (prompt
plus completion, as OpenAI counts them: the prompt's tokens and `max_tokens` for each choice, charged when the
request is admitted). Over a cap is a 429 in OpenAI's shape (`type` "requests" or "tokens", code
"rate_limit_exceeded") with `Retry-After`; every answer to a tenant with a per-minute limit carries OpenAI's
`x-ratelimit-limit-*`, `-remaining-*` and `-reset-*` headers (server/app.py adds them).

A tenant is the API key (the adapter's name without keys). Each tenant's in-flight cap defaults to the engine's
batch plus half the server's queue, so one tenant fills its own cap before the server's `--max-queue` and the others
keep being admitted. The per-minute limits are token buckets: full at the limit, refilled at limit / 60 a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.server.errors import APIError

SWEEP_AT = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_in_flight: int | None = None  # requests (choices and prompts each count) at once; None: the default cap
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(slots=True)
class Bucket:
    limit: int
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.at) * self.limit / 60.0)
        self.at = now

    def wait(self, n: int) -> float:
        """Seconds until `n` are there (a request over the whole limit waits for a full bucket)."""
        return max(0.0, min(n, self.limit) - self.level) * 60.0 / self.limit

    def headers(self, kind: str) -> dict[str, str]:
        return {f"x-ratelimit-limit-{kind}": str(self.limit),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
                f"x-ratelimit-reset-{kind}": duration(self.wait(self.limit))}


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class QuotaExceeded(APIError):
    """A 429 at a tenant's cap; `limit`: which one ("in_flight", "requests" or "tokens"), for /metrics."""

    def __init__(self, limit: str, message: str, headers: dict[str, str], type_: str) -> None:
        super().__init__(429, message, "rate_limit_exceeded", headers=headers, type_=type_)
        self.limit = limit


@dataclass(slots=True)
class Books:
    in_flight: int = 0
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit headers of the per-minute limits this tenant has."""
        return {**(self.requests.headers("requests") if self.requests else {}),
                **(self.tokens.headers("tokens") if self.tokens else {})}


@dataclass(slots=True)
class Quotas:
    default_in_flight: int  # a tenant's in-flight cap unless its limits set one
    clock: Callable[[], float] = time.monotonic
    books: dict[str, Books] = field(default_factory=dict)
    sweep_at: int = SWEEP_AT  # books held before the idle ones are dropped (then twice what is left, at least this)

    def _books(self, tenant: str, limits: Limits, now: float) -> Books:
        if tenant not in self.books and len(self.books) >= self.sweep_at:
            self._sweep(now)
        b = self.books.setdefault(tenant, Books())
        for name, limit in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
            bucket: Bucket | None = getattr(b, name)
            if limit is None:
                setattr(b, name, None)
            elif bucket is None or bucket.limit != limit:  # new, or the keys file changed it: start full
                setattr(b, name, Bucket(limit, float(limit), now))
            else:
                bucket.refill(now)
        return b

    def admit(self, tenant: str, limits: Limits, places: int, tokens: int) -> dict[str, str]:
        """Take `places` in flight, one request and `tokens` from the tenant's books, or raise the 429 naming the
        cap. Returns the x-ratelimit headers for the answer."""
        now = self.clock()
        b = self._books(tenant, limits, now)
        cap = limits.max_in_flight or self.default_in_flight
        headers = b.headers()
        if b.in_flight + places > cap:
            raise QuotaExceeded("in_flight", f"too many requests in flight for this tenant (its key; without keys, its "
                                f"adapter): {b.in_flight} running or queued, limit {cap}; retry when one finishes",
                                {**headers, "Retry-After": "1"}, "requests")
        for kind, bucket, n in (("requests", b.requests, 1), ("tokens", b.tokens, tokens)):
            if bucket is not None and bucket.level < min(n, bucket.limit):
                wait = bucket.wait(n)
                raise QuotaExceeded(kind, f"rate limit reached on {kind} per minute: limit {bucket.limit}, remaining "
                                    f"{math.floor(bucket.level)}, requested {n}; retry in {duration(wait)}",
                                    {**headers, "Retry-After": str(max(1, math.ceil(wait)))}, kind)
        for bucket, n in ((b.requests, 1), (b.tokens, tokens)):
            if bucket is not None:
                bucket.level -= n  # may go below 0 for a request over the whole limit: it waits for a full bucket
        b.in_flight += places
        return b.headers()

    def _sweep(self, now: float) -> None:
        """Drop the books that say nothing: nothing in flight and every bucket full again (a tenant starting anew
        gets the same). Without keys a tenant is any model name a request gives, so this keeps the books as small
        as the tenants of the last minute."""
        for tenant, b in list(self.books.items()):
            buckets = [k for k in (b.requests, b.tokens) if k is not None]
            for k in buckets:
                k.refill(now)
            if b.in_flight <= 0 and all(k.level >= k.limit for k in buckets):
                del self.books[tenant]
        self.sweep_at = max(SWEEP_AT, 2 * len(self.books))

    def release(self, tenant: str, places: int) -> None:
        b = self.books.get(tenant)
        if b is None:
            return
        b.in_flight -= places
        if b.in_flight <= 0 and b.requests is None and b.tokens is None:
            del self.books[tenant]  # nothing to remember: the books stay as small as the tenants in flight


class RateLimitHeaders:
    """ASGI middleware: a request's x-ratelimit headers (set on `request.state.ratelimit` at admission) on its
    answer, streamed or not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            extra = scope.get("state", {}).get("ratelimit") if message["type"] == "http.response.start" else None
            if extra:
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        await self.app(scope, receive, sending)
