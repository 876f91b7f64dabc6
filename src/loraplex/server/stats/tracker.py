"""Tracker: one HTTP request's timing and outcome (TTFT, time per output token, latency, tokens, status), into
/metrics and the dashboard's windows: the model's over every key and the calling key's own, and the fair-share
tenant's ledger (server/stats/shares.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraplex.engine.outputs import RequestOutput
from loraplex.server.stats.prometheus import ServerMetrics
from loraplex.server.stats.shares import TenantLedger
from loraplex.server.stats.tenants import TenantWindow


@dataclass(slots=True)
class Tracker:
    """Per-request timing for TTFT, time per output token and latency, into /metrics and the dashboard's rows:
    the tenant's window over every key, and the calling key's own (`owner`)."""

    metrics: ServerMetrics
    model: str  # the adapter's name (or the base model's); "unknown" for a name that was not found
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    owner: str | None = None  # the calling key's id (server/auth.py key_id); None on an open server
    cached_tokens: int = 0  # of the prompt, from the prefix cache (the first choice's)
    _label: str | None = None
    accepted: bool = False  # the engine took the request: only then may it create its tenant's dashboard rows
    _windows: list[TenantWindow] | None = None
    tenant: str | None = None  # the fair share's tenant (a key's id, or the adapter's name); None: no ledger
    weight: float = 1.0  # its weight
    _ledger: TenantLedger | None = None  # made once the engine has accepted the request

    @property
    def label(self) -> str:
        """The model label of this request's series, taken through the metrics' LabelGate at first use: only once
        the engine has accepted the name (or it is "unknown"), so a made-up name never takes a series."""
        if self._label is None:
            self._label = self.metrics.label(self.model)
        return self._label

    def windows(self) -> list[TenantWindow]:
        """The dashboard's windows of this request's tenant (server/stats/tenants.py), every key's and its own:
        created once the engine has accepted the request; before that only existing ones are used, so a made-up
        name never makes a row."""
        if self._windows is None:
            tenants, owners = self.metrics.tenants, [None] if self.owner is None else [None, self.owner]
            if self.accepted:
                self._windows = [tenants.window(self.model, o) for o in owners]
            else:
                found = [tenants.existing(self.model, o) for o in owners]
                self._windows = [w for w in found if w is not None]
        return self._windows

    def admitted(self) -> None:
        """The engine took the request: it is in flight, waiting for its first token."""
        if self.accepted:
            return
        self.accepted = True
        for w in self.windows():
            w.waiting += 1
        if self.tenant is not None:
            self._ledger = self.metrics.shares.ledger(self.tenant, self.weight)
            self._ledger.queued += 1

    def saw(self, out: RequestOutput) -> None:
        new = len(out.outputs[0].delta_token_ids)
        if not new:
            return
        windows = self.windows()
        now = time.monotonic()
        if self.first is None:
            self.first = time.perf_counter()
            self.cached_tokens = out.num_cached_tokens
            self.metrics.ttft.labels(self.label).observe(self.first - self.start)
            for w in windows:
                w.first_token(self.first - self.start, now)
                if self.accepted:
                    w.waiting, w.streaming = w.waiting - 1, w.streaming + 1
            if self._ledger is not None:
                self._ledger.queued, self._ledger.running = self._ledger.queued - 1, self._ledger.running + 1
        for w in windows:
            w.tokens(new, now)
        if self._ledger is not None:
            self._ledger.served(new, now)
        self.tokens += new

    def done(self, status: str) -> None:
        end = time.perf_counter()
        m = self.metrics
        m.requests.labels(self.label, status).inc()
        m.latency.labels(self.label).observe(end - self.start)
        m.generation_tokens.labels(self.label).inc(self.tokens)
        m.prompt_tokens.labels(self.label).inc(self.prompt_tokens)
        tpot = None
        if self.first is not None and self.tokens > 1:
            tpot = (end - self.first) / (self.tokens - 1)
            m.tpot.labels(self.label).observe(tpot)
        for w in self.windows():
            if self.accepted:  # leaves the in-flight count it entered
                if self.first is None:
                    w.waiting -= 1
                else:
                    w.streaming -= 1
            w.finished(status, self.prompt_tokens, tpot, time.monotonic(), self.cached_tokens)
        led, self._ledger = self._ledger, None  # done once, whatever calls it again
        if led is not None:
            if self.first is None:
                led.queued -= 1
            else:
                led.running -= 1
            led.prompt_tokens += self.prompt_tokens
