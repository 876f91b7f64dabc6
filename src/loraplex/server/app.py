"""build_app: the FastAPI application over an engine client (an AsyncLLMEngine, or a cluster's replicas)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from loraplex.engine.client import EngineClient
from loraplex.engine.prepare import PreparePool
from loraplex.server import admin_routes, dashboard_routes, errors, openai_routes
from loraplex.server.auth import Authenticator, KeyScope
from loraplex.server.guard import GuardConfig, RequestGuard
from loraplex.server.quotas import Limits, Quotas, RateLimitHeaders
from loraplex.server.stats.prometheus import ServerMetrics
from loraplex.server.state import ServerState

log = logging.getLogger(__name__)


def build_app(engine: EngineClient, served_name: str | None = None, keys: dict[str, KeyScope] | None = None,
              max_queue: int = 256, shutdown_engine: bool = True, max_metric_labels: int = 256,
              guard: GuardConfig | None = None, adapter_roots: Sequence[Path] | None = None,
              allowed_origins: Sequence[str] = (), tenant_weights: Mapping[str, float] | None = None,
              open_limits: Limits = Limits()) -> FastAPI:
    """The app; `guard`: Host names, body cap and timeout checked before any route (server/guard.py);
    `adapter_roots`: where runtime loads may read from (None: anywhere); `allowed_origins`: CORS (none: off);
    `tenant_weights` and `open_limits`: a keyless server's tenants (its adapters), their weights and each one's caps."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.draining = True  # uvicorn has stopped accepting and drained what it could
        state.prepare.shutdown()
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-tenant LoRA server")
    state = ServerState(
        engine=engine,
        auth=Authenticator(keys, open_limits),
        tenant_weights=dict(tenant_weights or {}),
        metrics=ServerMetrics(engine.facts.memory, engine.facts.dtype, engine.facts.device, max_metric_labels),
        served_name=served_name or engine.facts.model_name,
        max_in_flight=engine.facts.max_num_seqs + max_queue,
        prepare=PreparePool(engine.facts.max_prepare_seconds, name="loraplex-render"),
        adapter_roots=None if adapter_roots is None else tuple(Path(r).expanduser().resolve() for r in adapter_roots),
        # One tenant fills its own cap before the server's queue: the others keep being admitted.
        quotas=Quotas(default_in_flight=engine.facts.max_num_seqs + max(max_queue // 2, 1)),
    )
    app.state.loraplex = state
    errors.install(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(RequestGuard, config=guard or GuardConfig(), auth=state.auth)
    if allowed_origins:  # outside the guard: a browser's preflight carries no key, and is answered here
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)  # keys are bearer headers, never cookies
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard_routes.router)
    return app
