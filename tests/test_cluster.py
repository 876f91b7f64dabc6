"""`loraplex cluster` on one machine: Ray Serve, 2 engine replicas (fractional CPUs), the embedded model, real
PEFT adapters, through the official openai client. Outputs equal the single-engine server's; requests stick to
the replica holding their adapter, and a hot adapter spreads; a promotion reaches every replica while a stream
in flight finishes on its version; a replica killed mid-stream ends its stream with an error event and later
requests succeed; bad adapters are clear errors; /v1/stats shows the tenants and every replica's tiers."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ALL, ATTN, MLP
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import KeyScope, key_id
from loraplex.server.quotas import Limits
from server_util import free_port, running

ray = pytest.importorskip("ray")
from loraplex.cluster import app as cluster_app  # noqa: E402
from loraplex.cluster.config import ClusterConfig  # noqa: E402

pytestmark = pytest.mark.slow  # the whole file: its tests share a Ray cluster of two replicas (~40 s to start)

BASE = "SmolLM2-135M-Instruct"
ADMIN, LEGAL, CAPPED = "sk-admin", "sk-legal", "sk-capped"
KEYS = {ADMIN: KeyScope(frozenset({"*"}), admin=True), LEGAL: KeyScope(frozenset({"t0"})),
        CAPPED: KeyScope(frozenset({"*"}), weight=2.0, limits=Limits(requests_per_minute=3))}
TENANTS = [f"t{i}" for i in range(8)]
Q = [{"role": "user", "content": "What is the capital of France?"}]
CLUSTER = ClusterConfig(replicas=2, cpus_per_replica=0.5, max_adapters_per_replica=12, hot_adapter_threshold=2,
                        app_name="loraplex-test")


def _engine_config(store: Path, registry: bool = True) -> EngineConfig:
    return EngineConfig(dtype="float32", max_model_len=512, max_loras=8, max_cpu_loras=12, kv_cache_memory=64 << 20,
                        adapter_dir=str(store), registry_file=str(store / "registry.json") if registry else None)


@pytest.fixture(scope="module")
def store(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared adapter store: every tenant's adapter, found there just in time; one corrupt adapter."""
    store = tmp_path_factory.mktemp("store")
    targets = [ATTN, MLP, ALL]
    for i, t in enumerate(TENANTS):
        shutil.copytree(adapter_factory(f"cl{i}", r=4 + i, targets=targets[i % 3], seed=500 + i), store / t)
    for name, seed in (("solo", 600), ("hot", 601)):
        shutil.copytree(adapter_factory(f"cl_{name}", r=8, seed=seed), store / name)
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{not json")
    return store


@pytest.fixture(scope="module")
def cluster(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Runtime loads read from the store and from the tests' temporary adapters.
    server = ServerConfig(port=free_port(), allowed_adapter_roots=(tmp_path_factory.getbasetemp(),))
    url = cluster_app.start(_engine_config(store), server, CLUSTER, KEYS)
    try:
        _wait_for_replicas(url, 2)
        yield url
    finally:
        cluster_app.stop(CLUSTER)


def _wait_for_replicas(url: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        models = httpx.get(url + "/v1/models", headers=_auth())
        if models.status_code == 200 and len(models.json()["data"][0]["replicas"]) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{n} replicas did not report")


def _auth(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client(url: str, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def chat(url: str, model: str, key: str = ADMIN, **kw: object) -> str:
    r = client(url, key).chat.completions.create(model=model, messages=Q, max_tokens=12, temperature=0, **kw)
    return r.choices[0].message.content or ""


def metrics(url: str, name: str) -> dict[str, float]:
    """Every sample of one metric: its label text -> value."""
    out = {}
    for line in httpx.get(url + "/metrics", headers=_auth()).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            out[labels] = float(value)
    return out


def served_by(url: str, model: str) -> dict[str, float]:
    """Replica id -> requests it took for `model`, from the replicas' own reports."""
    found = {}
    for labels, n in metrics(url, "loraplex_replica_requests_total").items():
        parts = dict(p.split("=", 1) for p in labels.split(","))
        if parts["model"] == f'"{model}"':
            found[parts["replica"].strip('"')] = n
    return found


def _post(url: str, path: str, body: object, key: str = ADMIN) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=_auth(key), timeout=60)


def eventually(check: Callable[[], None], within: float = 10.0) -> None:
    """Run `check` until it passes: what the ingress shows of a replica comes from the replica's next report,
    every report_interval on an idle machine but later on a loaded one."""
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_outputs_equal_the_single_engine_server(cluster: str, store: Path) -> None:
    """Requests over 8 adapters and the base, sent together through the cluster, answer exactly what one
    engine behind `loraplex serve` answers (greedy, fp32); keys and errors behave as on the single server."""
    jobs = [BASE, *TENANTS, "t0", "t1"]

    async def together(url: str) -> list[str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0)
        rs = await asyncio.gather(*(ac.chat.completions.create(model=m, messages=Q, max_tokens=12, temperature=0)
                                    for m in jobs))
        await ac.close()
        return [r.choices[0].message.content or "" for r in rs]

    engine = AsyncLLMEngine(_engine_config(store, registry=False))
    with running(build_app(engine, keys=KEYS)) as single:
        expected = [chat(single, m) for m in jobs]
    assert len(set(expected)) == 9
    assert asyncio.run(together(cluster)) == expected
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client(cluster).chat.completions.create(
        model="t5", messages=Q, max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == expected[jobs.index("t5")]
    with pytest.raises(openai.PermissionDeniedError):
        chat(cluster, "t1", key=LEGAL)
    with pytest.raises(openai.AuthenticationError):
        chat(cluster, "t0", key="sk-wrong")
    with pytest.raises(openai.NotFoundError, match="not found"):
        chat(cluster, "ghost")
    assert [m.id for m in client(cluster, LEGAL).models.list().data] == [BASE, "t0"]


def test_stats_show_the_cluster_tenants_and_each_replicas_tiers(cluster: str) -> None:
    """/v1/stats on the ingress: the tenant rows of the requests it served, every replica's device slots and
    host entries (each saying its replica), the base model once with the replica count; the page is served."""
    assert chat(cluster, "t2") and chat(cluster, "t3")

    def shown() -> None:
        r = httpx.get(cluster + "/v1/stats", headers=_auth())
        assert r.status_code == 200, r.text
        stats = r.json()
        ids = {rep["id"] for rep in httpx.get(cluster + "/v1/models", headers=_auth()).json()["data"][0]["replicas"]}
        assert stats["model"]["id"] == BASE and stats["model"]["replicas"] == 2
        rows = {row["tenant"]: row for row in stats["tenants"]}
        assert rows["t2"]["requests"] >= 1 and rows["t3"]["requests"] >= 1
        slots = stats["adapters"]["slots"]
        assert {s["replica"] for s in slots} == ids == {rep["id"] for rep in stats["replicas"]}
        assert len(slots) == 2 * 8  # max_loras per replica
        held = {e["name"] for e in slots + stats["adapters"]["host"]["entries"] if e["name"]}
        assert {"t2", "t3"} <= held
        assert all(s["replica"] in ids for s in stats["batch"]["steps"]) and stats["batch"]["throughput"]
        # The fair share's books are the ingress's own, over every replica: the admin key's tokens are there.
        fair = {row["tenant"]: row for row in stats["fair_share"]["tenants"]}
        assert fair[key_id(ADMIN)]["output_tokens"] >= 2 and fair[key_id(ADMIN)]["queued"] >= 0

    eventually(shown)
    tenant = httpx.get(cluster + "/v1/stats", headers=_auth(LEGAL)).json()
    assert {row["tenant"] for row in tenant["tenants"]} <= {BASE, "t0"}  # a tenant key: its own rows only
    assert "replicas" not in tenant and "adapters" not in tenant
    assert httpx.get(cluster + "/dashboard").status_code == 200


def test_requests_stick_to_the_replica_holding_their_adapter(cluster: str) -> None:
    """Six requests for an adapter no replica held: the first loads it on one replica (a miss), the other five
    go to that replica and find it there (hits); that replica's residency shows it."""
    before = metrics(cluster, "loraplex_cluster_routing_total")
    answers = {chat(cluster, "solo") for _ in range(6)}
    assert len(answers) == 1
    after = metrics(cluster, "loraplex_cluster_routing_total")
    assert after['result="hit"'] - before['result="hit"'] == 5
    assert after['result="miss"'] - before['result="miss"'] == 1

    def shown() -> None:
        served = served_by(cluster, "solo")
        assert len(served) == 1 and list(served.values()) == [6]
        replica = next(iter(served))
        holders = {labels.split(",")[1] for labels in metrics(cluster, "loraplex_replica_adapter_resident")
                   if 'adapter="solo@1"' in labels}
        assert holders == {f'replica="{replica}"'}

    eventually(shown)


def test_a_hot_adapter_spreads_over_replicas(cluster: str) -> None:
    """Two streams for one adapter run on a replica (2 in flight is the hot threshold); six more requests for it,
    sent while those run, go by queue length (Ray's power of two choices sees the busy holder), the other replica
    claims the adapter, and both serve it. The first two are started before the rest are sent: eight sent at once
    would all meet empty queues, and Ray could put every one on the same replica."""
    body = {"model": "hot", "prompt": "Count slowly:", "max_tokens": 32, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    spilled = metrics(cluster, "loraplex_cluster_routing_total").get('result="spill"', 0.0)

    async def stream(ac: openai.AsyncOpenAI, started: asyncio.Event) -> str:
        text = ""
        async for chunk in await ac.completions.create(stream=True, **body):
            text += chunk.choices[0].text if chunk.choices else ""
            started.set()
        return text

    async def burst() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=cluster + "/v1", api_key=ADMIN, max_retries=0)
        events = [asyncio.Event(), asyncio.Event()]
        first = [asyncio.create_task(stream(ac, e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=60)
        rest = await asyncio.gather(*(ac.completions.create(**body) for _ in range(6)))
        texts = await asyncio.gather(*first) + [r.choices[0].text for r in rest]
        await ac.close()
        return texts

    assert len(set(asyncio.run(burst()))) == 1
    assert metrics(cluster, "loraplex_cluster_routing_total")['result="spill"'] >= spilled + 1

    def shown() -> None:
        assert len(served_by(cluster, "hot")) == 2

    eventually(shown)


def test_bad_adapters_are_clear_errors(cluster: str, store: Path) -> None:
    """A corrupt adapter in the store, or a load from a missing path, is a 4xx naming the cause, never a 500; a
    path outside the adapter roots is a 403."""
    r = _post(cluster, "/v1/chat/completions", {"model": "broken", "messages": Q, "max_tokens": 4})
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    r = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(store / "nonexistent")})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"})
    assert r.status_code == 403 and "--allowed-adapter-roots" in r.json()["error"]["message"]
    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, key=LEGAL).status_code == 403
    assert chat(cluster, BASE)  # and everyone else is still served


def test_promotion_reaches_every_replica_and_streams_finish_on_their_version(
        cluster: str, adapter_factory: Callable[..., Path]) -> None:
    v1, v2 = adapter_factory("cl_v1", r=8, seed=701), adapter_factory("cl_v2", r=8, targets=ALL, seed=702)
    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(v1)}).json()["version"] == "1"
    body = {"model": "fresh", "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    old = _post(cluster, "/v1/completions", body).json()["choices"][0]["text"]
    r = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(v2), "promote": False})
    assert r.json()["version"] == "2"
    new = _post(cluster, "/v1/completions", {**body, "model": "fresh@2"}).json()["choices"][0]["text"]
    assert new != old
    with httpx.stream("POST", cluster + "/v1/completions", json={**body, "stream": True}, headers=_auth(),
                      timeout=60) as stream:
        lines = stream.iter_lines()
        text = [json.loads(next(lines)[6:])["choices"][0]["text"]]  # the request is running on version 1
        assert _post(cluster, "/v1/promote_lora_adapter", {"lora_name": "fresh", "version": "2"}).status_code == 200
        # The promotion returned once every replica read it: each one's registry has version 2 current.
        fresh = next(m for m in httpx.get(cluster + "/v1/models", headers=_auth()).json()["data"] if m["id"] == "fresh")
        assert fresh["version"] == "2" and set(fresh["replica_versions"].values()) == {"2"}
        assert len(fresh["replica_versions"]) == 2
        assert _post(cluster, "/v1/completions", body).json()["choices"][0]["text"] == new
        for line in lines:
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(text) == old


def test_a_replica_killed_mid_stream_ends_it_with_an_error_and_the_survivor_serves(cluster: str) -> None:
    body = {"model": "t6", "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events = []
    before = metrics(cluster, "loraplex_cluster_routed_requests_total")
    with httpx.stream("POST", cluster + "/v1/completions", json=body, headers=_auth(), timeout=60) as stream:
        lines = stream.iter_lines()
        for _ in range(6):
            events.append(next(lines))
        # The ingress counts a request on its replica when that replica starts it, so this names the one streaming
        # (a replica's "running" gauge comes from its latest report and may still show an earlier test's stream).
        after = metrics(cluster, "loraplex_cluster_routed_requests_total")
        [labels] = [k for k, n in after.items() if 'model="t6"' in k and n > before.get(k, 0)]
        replica = re.search(r'replica="([^"]+)"', labels)[1]
        actor = ray.get_actor(f"SERVE_REPLICA::{CLUSTER.app_name}#EngineReplica#{replica}", namespace="serve")
        ray.kill(actor, no_restart=True)
        events += [line for line in lines if line]
    errors = [json.loads(e[6:])["error"] for e in events if e.startswith("data: {") and "error" in json.loads(e[6:])]
    assert events[-1] == "data: [DONE]" and len(errors) == 1
    assert errors[0]["type"] == "server_error" and "replica" in errors[0]["message"]
    assert chat(cluster, "t6") and chat(cluster, BASE)  # Ray routes to the survivor (and restarts the replica)


def test_a_keys_caps_and_books_hold_over_every_replica(cluster: str) -> None:
    """The ingress owns each key's books (issue 29, item 4): requests for adapters the replicas hold apart count
    against one per-minute cap, the 429 names it, and the key's fair-share row counts every replica's tokens."""
    for model in ("t4", "t5", "t6"):
        assert chat(cluster, model, CAPPED)
    with pytest.raises(openai.RateLimitError) as e:
        chat(cluster, "t7", CAPPED)
    assert e.value.type == "requests" and e.value.response.headers["x-ratelimit-limit-requests"] == "3"
    fair = httpx.get(cluster + "/v1/stats", headers=_auth(CAPPED)).json()["fair_share"]["tenants"]
    assert [(r["tenant"], r["weight"], r["throttled"]) for r in fair] == [(key_id(CAPPED), 2.0, {"requests": 1})]
    assert fair[0]["output_tokens"] >= 3 and fair[0]["queued"] == fair[0]["running"] == 0
