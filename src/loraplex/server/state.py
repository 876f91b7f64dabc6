"""ServerState: what every route needs — the engine, keys, metrics, admission limits, the served name."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.engine.client import AdapterSpec, EngineClient
from loraplex.engine.prepare import PreparePool
from loraplex.server.auth import Authenticator, KeyScope
from loraplex.server.errors import APIError
from loraplex.server.quotas import Quotas
from loraplex.server.stats.prometheus import ServerMetrics


@dataclass(slots=True)
class ServerState:
    engine: EngineClient  # the engine in this process, or a cluster's replicas (engine/client.py)
    auth: Authenticator
    metrics: ServerMetrics
    served_name: str
    max_in_flight: int  # running + waiting; more gets 503
    in_flight: int = 0
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # Chat templating and tokenization of requests, off the event loop under --max-prepare-seconds.
    prepare: PreparePool = field(default_factory=PreparePool)
    # Where runtime loads may read adapters from (--adapter-dir, --allowed-adapter-roots); None: anywhere (the
    # library's default; `serve` and `cluster` always confine).
    adapter_roots: tuple[Path, ...] | None = None
    # Each tenant's caps at the door (server/quotas.py); its in-flight cap by default below max_in_flight.
    quotas: Quotas = field(default_factory=lambda: Quotas(default_in_flight=1 << 30))
    # Without keys, each adapter's (or the base model's served name's) weight in the fair share; default 1.
    tenant_weights: dict[str, float] = field(default_factory=dict)

    def check_adapter_path(self, path: str) -> None:
        """403 unless `path`, symlinks resolved, lies under one of the adapter roots."""
        if self.adapter_roots is None:
            return
        where = Path(path).expanduser().resolve()
        if not any(where.is_relative_to(root) for root in self.adapter_roots):
            roots = ", ".join(str(r) for r in self.adapter_roots) or "none"
            raise APIError(403, f"lora_path {path!r} is outside the directories adapters may be loaded from at run "
                           f"time ({roots}); add one with --allowed-adapter-roots", "permission_denied",
                           "lora_path")

    def resolve_model(self, model: str, scope: KeyScope) -> AdapterSpec | None:
        """What a `model` field names, parsed once for the whole request (None: the base model), after the key's
        permission check; the spec goes down to the engine as it is, never as text to parse again."""
        if model in (self.served_name, self.engine.facts.model_name):
            self.auth.check_model(scope, None, model)
            return None
        spec = AdapterSpec.parse(model)  # InvalidAdapterNameError -> 400
        self.auth.check_model(scope, spec.name, model)
        return spec

    def admit(self, n: int = 1) -> None:
        """Take n places in the bounded queue, or refuse with 503."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "shutting_down", headers={"Retry-After": "5"})
        if self.in_flight + n > self.max_in_flight:
            raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight, limit "
                           f"{self.max_in_flight}); retry later", "server_overloaded", headers={"Retry-After": "1"})
        self.in_flight += n

    def leave(self, n: int = 1) -> None:
        self.in_flight -= n
