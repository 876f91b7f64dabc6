"""Run a real uvicorn server for an app on a free loopback port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app: FastAPI, **options: Any) -> Iterator[str]:
    """`options`: more uvicorn.Config arguments (a server's limits: serve.uvicorn_limits)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(url: str, name: str, labels: str = "", key: str | None = None) -> float:
    """Read one sample from /metrics, e.g. metric(url, "loraplex_kv_cache_blocks", 'state="used"')."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}  # with keys: the admin or a metrics key
    for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
        if line.startswith(name + ("{" + labels + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{{{labels}}}")
