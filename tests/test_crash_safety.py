"""The adapter registry survives kill -9 at any moment: 8 times (LORAPLEX_CRASH_KILLS for more), a server under load is killed while admin calls
register and promote versions, then restarted on the same registry file; each time the file reads, every adapter
is at the version of its last acknowledged change or of the change in flight, and serves. A full disk during a
registry write is a 507 that names the cause, and the old state stays.

Each server is a real `loraplex serve` process, forked from a forkserver that has imported torch and transformers
once (multiprocessing's forkserver): a restart then costs the engine's start, not the imports."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import fill_disk
from server_util import free_port

ADAPTERS = ["t0", "t1", "t2"]
KILLS = int(os.environ.get("LORAPLEX_CRASH_KILLS", "8"))  # each a random moment of the registrations


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    # What a start imports, found with python -X importtime (transformers imports most of it lazily).
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.utils.type_validators",
                                "transformers.conversion_mapping", "transformers.models.auto.tokenization_auto",
                                "loraplex.cli", "loraplex.engine.async_engine", "loraplex.server.app", "uvicorn",
                                "fastapi"])
    return ctx


class Server:
    def __init__(self, ctx: multiprocessing.context.ForkServerContext, registry: Path, extra: list[str] = ()) -> None:  # type: ignore[assignment]
        from loraplex.cli import main

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--port", str(self.port), "--dtype", "float32", "--registry-file", str(registry),
                "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--max-loras", "4",
                "--allowed-adapter-roots", tempfile.gettempdir(), *extra]  # the tests' adapters live there
        self.proc = ctx.Process(target=main, args=(args,), daemon=True)
        self.proc.start()
        try:
            self._wait_up()
        except BaseException:  # a server that failed to come up does not outlive its test
            self.kill()
            raise

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.is_alive(), f"server exited with {self.proc.exitcode}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no handler runs, no file is closed cleanly
        self.proc.join(10)


class Truth:
    """What the clients were told: each adapter's acknowledged current version, and the change in flight."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # adapter -> the version an unacknowledged change would make current
        self.versions: dict[str, list[str]] = {}
        self.next = 1
        self.lock = threading.Lock()

    def allowed(self, name: str) -> set[str]:
        return {v for v in (self.current.get(name), self.pending.get(name)) if v is not None}


def admin_loop(url: str, truth: Truth, weights: list[Path], stop: threading.Event, seed: int) -> None:
    """Register (promoted or staged) and promote versions as fast as the server answers, until it dies."""
    rng = random.Random(seed)
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            name = rng.choice(ADAPTERS)
            with truth.lock:
                staged = False  # a registration that is not promoted (the first of a name is current anyway)
                if len(truth.versions.get(name, [])) > 1 and rng.random() < 0.3:
                    version, path = rng.choice(truth.versions[name]), "/v1/promote_lora_adapter"
                    body: dict[str, object] = {"lora_name": name, "version": version}
                else:
                    version, truth.next = str(truth.next), truth.next + 1
                    staged = name in truth.current and rng.random() < 0.3
                    path = "/v1/load_lora_adapter"
                    body = {"lora_name": name, "lora_path": str(rng.choice(weights)), "version": version,
                            "promote": not staged}
                if not staged:
                    truth.pending[name] = version
            try:
                r = client.post(url + path, json=body)
            except httpx.TransportError:
                return  # killed: the change stays pending
            with truth.lock:
                truth.pending.pop(name, None)
                assert r.status_code == 200, r.text
                if path.endswith("load_lora_adapter"):
                    truth.versions.setdefault(name, []).append(version)
                if not staged:
                    truth.current[name] = version


def request_loop(url: str, stop: threading.Event) -> None:
    """Traffic on the base model and the adapters while the admin calls run."""
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            model = (["base"] + ADAPTERS)[i % 4]
            i += 1
            try:
                client.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4})
            except httpx.TransportError:
                return


def check_state(url: str, registry: Path, truth: Truth) -> None:
    if not registry.exists():  # killed before the first registration was written
        assert not truth.current
        truth.pending.clear()
        return
    state = json.loads(registry.read_text())  # always a whole file: never half-written
    models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    for name in set(truth.current) | set(truth.pending):
        if name not in state["adapters"]:  # its first registration was in flight and did not land
            assert name not in truth.current
            continue
        on_disk = state["adapters"][name]["current"]
        assert on_disk in truth.allowed(name), (name, on_disk, truth.allowed(name))
        assert models[name]["version"] == on_disk
        truth.current[name] = on_disk  # the change in flight either landed or did not: now known
        truth.versions[name] = [v for v in truth.versions.get(name, []) if v in state["adapters"][name]["versions"]]
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["system_fingerprint"] == f"{name}@{on_disk}"
    truth.pending.clear()


@pytest.mark.slow
def test_registry_survives_kill_9_under_load(forkserver: multiprocessing.context.ForkServerContext, tmp_path: Path,
                                             adapter_factory: Callable[..., Path]) -> None:
    weights = [adapter_factory(f"crash{i}", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=300 + i) for i in range(3)]
    registry = tmp_path / "registry.json"
    truth = Truth()
    rng = random.Random(0)
    for kill in range(KILLS + 1):
        server = Server(forkserver, registry, ["--served-model-name", "base"])
        try:
            check_state(server.url, registry, truth)
            if kill == KILLS:
                break
            stop = threading.Event()
            threads = [threading.Thread(target=admin_loop, args=(server.url, truth, weights, stop, kill)),
                       threading.Thread(target=request_loop, args=(server.url, stop))]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 0.8))  # a random moment of the registrations
        finally:
            server.kill()
        stop.set()
        for t in threads:
            t.join(30)
    assert len(truth.current) == len(ADAPTERS)  # every adapter was registered along the way
    assert sum(len(v) for v in truth.versions.values()) >= len(ADAPTERS)


def test_full_disk_is_a_507_and_keeps_the_state(forkserver: multiprocessing.context.ForkServerContext,
                                                small_disk: Path, adapter_factory: Callable[..., Path]) -> None:
    weights = adapter_factory("crash0", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=300)
    registry = small_disk / "registry.json"
    server = Server(forkserver, registry)
    try:
        load = {"lora_name": "t0", "lora_path": str(weights)}
        assert httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60).status_code == 200
        before = registry.read_text()
        filler = fill_disk(small_disk)
        r = httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60)
        assert r.status_code == 507, r.text
        assert "No space left on device" in r.json()["error"]["message"]
        assert registry.read_text() == before
        models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
        assert models["t0"]["versions"] == ["1"]
        ok = httpx.post(server.url + "/v1/completions", json={"model": "t0", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["system_fingerprint"] == "t0@1"
        filler.unlink()
        r = httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == "2"
    finally:
        server.kill()
