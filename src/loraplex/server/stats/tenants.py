"""Per-tenant windows for the dashboard: requests/s and tokens/s over the last seconds, TTFT and time per output
token percentiles over the last minutes, errors by status, requests in flight. A tenant is the base model or an
adapter name.

Each tenant has a window over every key's requests (the admin's view) and one per key that used it (a tenant
key's view: its own traffic only, never another key's, even on an adapter or base model two keys share).
Everything is bounded: each window keeps fixed-size rings, and at most `max_tenants` windows are tracked (the
least recently active is dropped first). Rows are created only for models a request resolved to (the base
model or a registered adapter); an unknown name is a 404 before any row exists. Used on the event loop only.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from loraplex.server.stats.per_second import PerSecond

RATE_WINDOW_S = 10  # requests/s and tokens/s: over the last 10 s (one bucket per second)
LATENCY_WINDOW_S = 300  # TTFT and TPOT percentiles: over the last 5 minutes ...
LATENCY_SAMPLES = 512  # ... and at most the last 512 requests
MAX_TENANTS = 4096  # windows: (tenant, key) pairs with traffic


@dataclass(frozen=True, slots=True)
class TenantRow:
    requests_per_s: float
    tokens_per_s: float  # output tokens
    requests: int  # finished since start, any status
    output_tokens: int
    prompt_tokens: int
    ttft_p50: float | None  # seconds; None without a sample in the window
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    errors: dict[str, int]  # HTTP status -> requests since start (4xx, 499, 5xx)
    waiting: int = 0  # in flight: accepted, no token yet
    streaming: int = 0  # in flight: tokens flowing
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, since start


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of unsorted values; None when there are none."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


class TenantWindow:
    def __init__(self) -> None:
        self._recent = PerSecond(RATE_WINDOW_S, counters=2)  # requests finished, output tokens
        self._ttft: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES)  # (when, seconds)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES)
        self.requests = self.output_tokens = self.prompt_tokens = self.cached_tokens = 0
        self.waiting = self.streaming = 0
        self.errors: dict[str, int] = {}  # keyed by HTTP status: a small fixed set

    def tokens(self, n: int, now: float) -> None:
        self._recent.add(now, 1, n)
        self.output_tokens += n

    def first_token(self, ttft: float, now: float) -> None:
        self._ttft.append((now, ttft))

    def finished(self, status: str, prompt_tokens: int, tpot: float | None, now: float, cached_tokens: int = 0) -> None:
        self._recent.add(now, 0, 1)
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        if tpot is not None:
            self._tpot.append((now, tpot))
        if status != "200":
            self.errors[status] = self.errors.get(status, 0) + 1

    def row(self, now: float) -> TenantRow:
        finished, tokens = self._recent.sums(now)
        ttft = [v for t, v in self._ttft if t > now - LATENCY_WINDOW_S]
        tpot = [v for t, v in self._tpot if t > now - LATENCY_WINDOW_S]
        return TenantRow(
            requests_per_s=finished / RATE_WINDOW_S,
            tokens_per_s=tokens / RATE_WINDOW_S,
            requests=self.requests, output_tokens=self.output_tokens, prompt_tokens=self.prompt_tokens,
            ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
            tpot_p50=percentile(tpot, 50), tpot_p99=percentile(tpot, 99),
            errors=dict(self.errors), waiting=self.waiting, streaming=self.streaming, cached_tokens=self.cached_tokens,
        )


Owner = str | None  # a key's id (server/auth.py key_id); None: the window over every key


class TenantStats:
    def __init__(self, max_tenants: int = MAX_TENANTS) -> None:
        self.max_tenants = max_tenants
        self._windows: OrderedDict[tuple[str, Owner], TenantWindow] = OrderedDict()  # least recently active first

    def window(self, tenant: str, owner: Owner = None) -> TenantWindow:
        w = self._windows.get((tenant, owner))
        if w is None:
            w = self._windows[(tenant, owner)] = TenantWindow()
            if len(self._windows) > self.max_tenants:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end((tenant, owner))
        return w

    def existing(self, tenant: str, owner: Owner = None) -> TenantWindow | None:
        """The tenant's window if it has one; never creates a row (for requests refused before the engine)."""
        return self._windows.get((tenant, owner))

    def rows(self, registered: list[str], show: set[str], now: float | None = None,
             owner: Owner = None) -> dict[str, TenantRow]:
        """A row for each registered tenant that has had traffic (from `owner`'s key; None: any key) or is in
        `show` (zeros without traffic). Windows of tenants no longer registered (an adapter since unloaded) are
        dropped: the map never outgrows them."""
        now = time.monotonic() if now is None else now
        wanted = set(registered)
        for gone in [k for k in self._windows if k[0] not in wanted]:
            del self._windows[gone]
        return {t: (self._windows.get((t, owner)) or TenantWindow()).row(now) for t in registered
                if (t, owner) in self._windows or t in show}
