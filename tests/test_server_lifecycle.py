"""`loraplex serve` as a user runs it: SIGTERM drains the request in flight and exits cleanly; new requests
are refused while draining; a non-loopback bind without keys warns."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server_util import dies_with_this_process, free_port, wait_up

REPO = Path(__file__).resolve().parents[1]


def _start(port: int, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), "--max-model-len", "512",
           "--drain-timeout", "20", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=dies_with_this_process)


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(port)
    try:
        wait_up(url, proc)
        events: list[str] = []
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 60, "ignore_eos": True, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=stream)
        reader.start()
        while len(events) < 3:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # while draining: refused (503), or the listener is already closed
            refused = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=5).status_code
        except httpx.TransportError:
            refused = 503
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert refused == 503
        assert events[-1] == "data: [DONE]"  # the request in flight finished
        tokens = sum(1 for e in events[:-1] if json.loads(e[6:])["choices"] and
                     json.loads(e[6:])["choices"][0]["delta"].get("content"))
        assert tokens >= 50 and time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()


def test_open_server_on_public_address_only_when_asked_and_warns() -> None:
    """Without keys a public address is refused (tests/test_safe_defaults.py); --insecure-no-api-keys allows it,
    with a warning in the log."""
    port = free_port()
    proc = _start(port, "--host", "0.0.0.0", "--insecure-no-api-keys")
    try:
        wait_up(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "--insecure-no-api-keys: the server on 0.0.0.0 is open" in out
