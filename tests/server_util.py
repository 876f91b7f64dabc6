"""Run a real uvicorn server for an app on a free loopback port, in a background thread."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
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
    try:  # stopped on every way out: a start that fails, a test that fails, a fixture torn down
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive():
                raise RuntimeError("server exited while starting (its error is logged above)")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 30 s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_up(url: str, proc: subprocess.Popen[str], within: float = 60.0) -> None:
    """Until a server process answers /health; its output in the failure if it exits first."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    raise AssertionError(f"server did not come up within {within:g} s")


def dies_with_this_process() -> None:
    """A child's preexec_fn: the kernel sends it SIGKILL when the process that started it ends, however it ends
    (pytest-timeout ends a hung test's worker with os._exit, which runs no `finally`). Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def metric(url: str, name: str, labels: str = "", key: str | None = None) -> float:
    """Read one sample from /metrics, e.g. metric(url, "loraplex_kv_cache_blocks", 'state="used"')."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}  # with keys: the admin or a metrics key
    for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
        if line.startswith(name + ("{" + labels + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{{{labels}}}")


def stop(proc: subprocess.Popen[str], within: float = 60.0) -> None:
    """SIGTERM a server process (it drains and exits), killed if it has not ended within `within` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
