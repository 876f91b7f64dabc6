"""Each fair-share tenant's books for /metrics, /v1/stats and the dashboard (issue 29, item 5): its weight, requests
queued (accepted, no token yet) and running (tokens flowing), prompt and output tokens served, 429s by the cap hit
and the last cap that bit, and its share of the output tokens of the last minute beside the share its weight
entitles it to.

A tenant is the fair share's (server/request_job.py `RequestJob.tenant`): a key's id (never the key), or without
keys an adapter's name (the base model by its served name). It is counted where requests come in, so behind a
cluster the ingress's books hold across the replicas. A ledger is made only for a key, or for an adapter once the
engine has accepted one of its requests, so a made-up model name never makes one; at most `max_tenants` are kept
(the least recently active dropped first), each a fixed ring of seconds. Used on the event loop only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from loraplex.server.stats.per_second import PerSecond

SHARE_WINDOW_S = 60  # shares: output tokens over the last minute (one bucket per second)
MAX_TENANTS = 4096


@dataclass(frozen=True, slots=True)
class ShareRow:
    tenant: str
    weight: float
    queued: int
    running: int
    prompt_tokens: int  # since start
    output_tokens: int
    window_tokens: int  # output tokens in the last SHARE_WINDOW_S
    share: float | None  # window_tokens / every tenant's; None when nobody was served in the window
    weight_share: float  # weight / the weights of the tenants active now (in flight, or served in the window)
    throttled: dict[str, int]  # the cap hit ("in_flight", "requests", "tokens") -> 429s since start
    last_limit: str | None  # the cap of the latest 429
    last_throttled: float | None  # its unix time


@dataclass(slots=True)
class TenantLedger:
    weight: float = 1.0
    queued: int = 0
    running: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    throttled: dict[str, int] = field(default_factory=dict)
    last_limit: str | None = None
    last_throttled: float | None = None
    _recent: PerSecond = field(default_factory=lambda: PerSecond(SHARE_WINDOW_S))  # output tokens

    def served(self, n: int, now: float) -> None:
        """`n` output tokens at monotonic time `now`."""
        self._recent.add(now, 0, n)
        self.output_tokens += n

    def window(self, now: float) -> int:
        return self._recent.sums(now)[0]

    def throttle(self, limit: str) -> None:
        self.throttled[limit] = self.throttled.get(limit, 0) + 1
        self.last_limit, self.last_throttled = limit, time.time()


class Shares:
    def __init__(self, max_tenants: int = MAX_TENANTS) -> None:
        self.max_tenants = max_tenants
        self._ledgers: OrderedDict[str, TenantLedger] = OrderedDict()  # least recently active first
        self.unattributed: dict[str, int] = {}  # 429s of a name with no ledger (a keyless name never accepted)

    def ledger(self, tenant: str, weight: float) -> TenantLedger:
        """The tenant's ledger (made if new), its weight as the request that touches it says (a reloaded keys file
        changes it)."""
        led = self._ledgers.get(tenant)
        if led is None:
            led = self._ledgers[tenant] = TenantLedger(weight)
            if len(self._ledgers) > self.max_tenants:
                self._ledgers.popitem(last=False)
        else:
            self._ledgers.move_to_end(tenant)
            led.weight = weight
        return led

    def existing(self, tenant: str) -> TenantLedger | None:
        return self._ledgers.get(tenant)

    def throttled(self, tenant: str, weight: float, limit: str, known: bool) -> bool:
        """A 429 at `limit`; `known`: the tenant is a key (else its ledger must exist already). Whether it was
        counted as the tenant's (else under `unattributed`)."""
        led = self.ledger(tenant, weight) if known else self.existing(tenant)
        if led is None:
            self.unattributed[limit] = self.unattributed.get(limit, 0) + 1
            return False
        led.throttle(limit)
        return True

    def rows(self, now: float | None = None) -> dict[str, ShareRow]:
        """Every tenant's row (`now`: monotonic)."""
        now = time.monotonic() if now is None else now
        window = {t: led.window(now) for t, led in self._ledgers.items()}
        active = {t for t, led in self._ledgers.items() if window[t] or led.queued or led.running}
        total, weights = sum(window.values()), sum(self._ledgers[t].weight for t in active)
        return {t: ShareRow(
            tenant=t, weight=led.weight, queued=led.queued, running=led.running, prompt_tokens=led.prompt_tokens,
            output_tokens=led.output_tokens, window_tokens=window[t], share=window[t] / total if total else None,
            weight_share=led.weight / weights if t in active else 0.0,
            throttled=dict(led.throttled), last_limit=led.last_limit, last_throttled=led.last_throttled)
            for t, led in self._ledgers.items()}
