"""`loraplex serve`: the engine behind uvicorn, with SIGTERM draining."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn

from loraplex.config import EngineConfig

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF model directory or .gguf file (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-keys", type=Path, default=None, help="JSON file mapping API keys to their adapters")
    p.add_argument("--adapter-dir", default=None)
    p.add_argument("--registry-file", default=None, help="where run-time adapter registrations persist")
    p.add_argument("--max-cpu-loras", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond --max-num-seqs before 503")
    p.add_argument("--drain-timeout", type=int, default=30, help="seconds to finish requests in flight on SIGTERM")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for the model (default: every core; OpenMP threads sleep between steps)")


def torch_threads(requested: int | None) -> int:
    """The engine's torch threads on CPU: every core. The HTTP event loop needs a core only between steps,
    and gets one because OpenMP's threads stop spinning soon after a step (GOMP_SPINCOUNT, set by the CLI
    before torch loads). On 2 cores, 64 streams over 8 adapters made 340 tok/s so against 271 with one
    core left to the event loop, with the same time per output token at 4 req/s (benchmarks/serving.py)."""
    if requested is not None:
        if requested < 1:
            raise SystemExit("--torch-threads must be >= 1")
        return requested
    return os.cpu_count() or 1


def serve(args: argparse.Namespace, lora_modules: dict[str, str]) -> None:
    from loraplex.cli import engine_kwargs

    config = EngineConfig(
        model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_cpu_loras=args.max_cpu_loras, lora_modules=tuple(lora_modules.items()), adapter_dir=args.adapter_dir,
        registry_file=args.registry_file, **engine_kwargs(args),  # type: ignore[arg-type]
    )
    import torch

    from loraplex.engine.async_engine import AsyncLLMEngine  # torch and the model: not needed for --help
    from loraplex.server.app import build_app
    from loraplex.server.auth import load_keys

    if config.device == "cpu":
        torch.set_num_threads(torch_threads(args.torch_threads))
        log.info("torch uses %d CPU threads (OpenMP spin count %s)", torch.get_num_threads(),
                 os.environ.get("GOMP_SPINCOUNT", "default"))
    keys = load_keys(args.api_keys) if args.api_keys else None
    if keys is None and not is_loopback(args.host):
        log.warning("no --api-keys file: the server on %s is open to anyone who can reach it", args.host)
    engine = AsyncLLMEngine(config)
    app = build_app(engine, args.served_model_name, keys, args.max_queue)
    log.info("serving %s with %d adapters registered on http://%s:%d", app.state.loraplex.served_name,
             len(engine.engine.adapters.registry.entries), args.host, args.port)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.drain_timeout), app)
    server.run()
