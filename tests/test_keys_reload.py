"""`loraplex serve --api-keys keys.json` reads the keys file again on SIGHUP: keys come and go, their caps change, a
key's books carry over the reload, and a broken file leaves the keys in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_util import dies_with_this_process, free_port, stop, wait_up

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BASE = "SmolLM2-135M-Instruct"


def ask(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": BASE, "prompt": "Hi", "max_tokens": 1})


def until(check: object, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the reload did not take effect"
        time.sleep(0.1)


def test_sighup_reloads_the_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-old": {"adapters": []}, "sk-kept": {"adapters": [],
                                                                                 "requests_per_minute": 2}}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "serve", "--api-keys", str(keys), "--port", str(port),
         "--dtype", "float32", "--max-model-len", "256", "--log-level", "info"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=dies_with_this_process,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_up(url, proc, within=120)
        assert ask(url, "sk-old").status_code == 200 and ask(url, "sk-new").status_code == 401
        assert ask(url, "sk-kept").headers["x-ratelimit-remaining-requests"] == "1"
        # sk-old goes, sk-new comes with a cap of its own; sk-kept's cap is the same and its books carry over.
        keys.write_text(json.dumps({"keys": {"sk-new": {"adapters": [], "max_in_flight": 1},
                                             "sk-kept": {"adapters": [], "requests_per_minute": 2}}}))
        proc.send_signal(signal.SIGHUP)
        until(lambda: ask(url, "sk-new").status_code == 200)
        assert ask(url, "sk-old").status_code == 401
        assert ask(url, "sk-kept").headers["x-ratelimit-remaining-requests"] == "0"
        assert ask(url, "sk-kept").status_code == 429  # the reload did not refill its bucket
        # A broken file is logged; the keys in use stay.
        keys.write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert ask(url, "sk-new").status_code == 200 and proc.poll() is None
    finally:
        stop(proc)
    out = proc.stdout.read() if proc.stdout else ""
    assert "SIGHUP: 2 API keys reloaded" in out and "SIGHUP: the keys file was not reloaded" in out, out[-3000:]
