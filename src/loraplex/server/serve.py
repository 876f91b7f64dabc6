"""`loraplex serve`: the engine behind uvicorn, with SIGTERM draining."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn

from loraplex.config import EngineConfig, ServerConfig
from loraplex.errors import LoraplexError
from loraplex.server.guard import GuardConfig, allowed_hosts
from loraplex.server.header_deadline import with_header_timeout

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new requests (503, /health 503) while uvicorn drains those in flight
    for up to --drain-timeout seconds, then stop the engine and exit."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self._app.state.loraplex.draining:
            log.info("signal %d: draining requests in flight (up to %ss), refusing new ones", sig,
                     self.config.timeout_graceful_shutdown)
        self._app.state.loraplex.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals once it has stopped; a drained SIGTERM is a planned, clean stop: exit 0.
            self._captured_signals.remove(sig)


def reload_keys_on_sighup(app: Any, server: ServerConfig) -> None:
    """SIGHUP reads the keys file again (keys, scopes, weights and caps); a file that cannot be read or is invalid
    is logged and the keys in use stay. A key's books (requests in flight, per-minute buckets) carry over."""
    from loraplex.server.auth import server_keys

    def reload(sig: int, frame: Any) -> None:
        try:
            keys = server_keys(server.api_keys, server.admin_keys)
        except LoraplexError as e:
            log.error("SIGHUP: the keys file was not reloaded, the keys in use stay: %s", e)
            return
        app.state.loraplex.auth.replace_keys(keys or {})
        log.info("SIGHUP: %d API keys reloaded from %s", len(keys or {}), server.api_keys)

    signal.signal(signal.SIGHUP, reload)


def tenant_settings(server: ServerConfig) -> dict[str, Any]:
    """build_app's keyless tenant settings from the --tenant-* flags (with keys, the keys file sets them)."""
    from loraplex.server.quotas import Limits

    return {"tenant_weights": dict(server.tenant_weights),
            "open_limits": Limits(server.tenant_max_in_flight, server.tenant_requests_per_minute,
                                  server.tenant_tokens_per_minute)}


def guard_config(server: ServerConfig) -> GuardConfig:
    """What the server checks before any route: Host names (server/guard.py), body size and time."""
    return GuardConfig(allowed_hosts(server.host, server.allowed_hosts), server.max_body_size, server.body_timeout)


def adapter_roots(engine: EngineConfig, server: ServerConfig) -> tuple[Path, ...] | None:
    """Where runtime loads may read adapters: --adapter-dir and --allowed-adapter-roots (none: no path loads);
    None, anywhere the server can read, under vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING (ServerConfig.any_adapter_path)."""
    if server.any_adapter_path:
        return None
    roots = [Path(engine.adapter_dir)] if engine.adapter_dir else []
    return tuple(roots + list(server.allowed_adapter_roots))


def uvicorn_limits(server: ServerConfig) -> dict[str, Any]:
    """uvicorn's bounds on connections: how many at once (more get a 503), how long an idle one stays, how long
    a request's headers may take (server/header_deadline.py)."""
    return {"limit_concurrency": server.limit_concurrency, "timeout_keep_alive": server.timeout_keep_alive,
            "http": with_header_timeout(server.header_timeout)}


def torch_threads(requested: int | None) -> int:
    """The engine's torch threads on CPU: every core. The HTTP event loop needs a core only between steps,
    and gets one because OpenMP's threads stop spinning soon after a step (GOMP_SPINCOUNT, set by the CLI
    before torch loads), so a core left to the event loop would only be taken from the forward pass: every
    core gives more throughput at the same time per output token (benchmarks/serving.py measures both and
    records the server's thread count)."""
    return requested if requested is not None else os.cpu_count() or 1


def serve(engine_config: EngineConfig, server: ServerConfig) -> None:
    """Build the engine, then serve it over HTTP until SIGTERM (drained) or SIGINT."""
    import torch

    from loraplex.engine.async_engine import AsyncLLMEngine  # torch and the model: not needed for --help
    from loraplex.server.app import build_app
    from loraplex.server.auth import server_keys

    from loraplex.hardware import resolve_device

    if resolve_device(engine_config.device) == "cpu":
        torch.set_num_threads(torch_threads(server.torch_threads))
        log.info("torch uses %d CPU threads (OpenMP spin count %s)", torch.get_num_threads(),
                 os.environ.get("GOMP_SPINCOUNT", "default"))
    keys = server_keys(server.api_keys, server.admin_keys)
    if keys is None and server.insecure_no_api_keys:
        log.warning("--insecure-no-api-keys: the server on %s is open, as admin, to anyone who can reach it",
                    server.host)
    if server.any_adapter_path:
        log.warning("VLLM_ALLOW_RUNTIME_LORA_UPDATING: runtime loads may read any path this process can read (%s)",
                    "admin keys only" if keys else "an open server, on loopback only")
    engine = AsyncLLMEngine(engine_config)
    app = build_app(engine, server.served_model_name, keys, server.max_queue,
                    max_metric_labels=server.max_metric_labels, guard=guard_config(server),
                    adapter_roots=adapter_roots(engine_config, server), allowed_origins=server.allowed_origins,
                    **tenant_settings(server))
    if server.api_keys is not None:
        reload_keys_on_sighup(app, server)
    log.info("serving %s on http://%s:%d", app.state.loraplex.served_name, server.host, server.port)
    uvicorn_server = DrainingServer(uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level,
                                                   root_path=server.root_path,
                                                   timeout_graceful_shutdown=server.drain_timeout,
                                                   **uvicorn_limits(server)), app)
    uvicorn_server.run()
