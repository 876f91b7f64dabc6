"""The dashboard's book-keeping without a model: per-tenant windows (rates, percentiles, bounds), the engine's
step log (prefill vs decode per adapter, fixed-size rings), the adapter manager's tier view, and /v1/stats over
a cluster's replicas."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.metrics import AdapterStats, Histogram
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.tiers import ResidentAdapter, TierView
from loraplex.engine.client import EngineClient
from loraplex.engine.facts import EngineFacts, MemoryPlan
from loraplex.engine.outputs import EngineSnapshot, EngineStats, PrefixCacheSnapshot
from loraplex.engine.request import Request
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.engine.step_log import BatchHistory, StepLog, StepRecord, ThroughputPoint
from loraplex.sampling import SamplingParams
from loraplex.server.auth import KeyScope
from loraplex.server.stats.view import combined, stats_json, tenant_rows
from loraplex.server.stats.tenants import LATENCY_SAMPLES, LATENCY_WINDOW_S, RATE_WINDOW_S, TenantStats, percentile


@pytest.mark.parametrize("n", [1, 2, 7, 100, 513])
def test_percentile_is_nearest_rank(n: int) -> None:
    values = [random.Random(n).uniform(0, 5) for _ in range(n)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="inverted_cdf")))
    assert percentile([], 50) is None


def test_tenant_window_rates_and_latency_window() -> None:
    stats = TenantStats()
    w = stats.window("legal")
    t0 = 1000.0
    for i in range(20):  # 20 requests over the last 10 s, 5 tokens each
        now = t0 + i * 0.5
        w.first_token(0.1 + i / 100, now)
        w.tokens(5, now)
        w.finished("200", prompt_tokens=30, tpot=0.02, now=now)
    w.finished("404", prompt_tokens=0, tpot=None, now=t0 + 9.9)  # an error is a request with a status
    row = stats.rows(["legal"], set(), now=t0 + 9.9)["legal"]
    assert row.requests == 21 and row.output_tokens == 100 and row.prompt_tokens == 600
    assert row.requests_per_s == pytest.approx(21 / RATE_WINDOW_S) and row.tokens_per_s == pytest.approx(100 / RATE_WINDOW_S)
    assert row.ttft_p50 == pytest.approx(0.19) and row.ttft_p99 == pytest.approx(0.29) and row.tpot_p50 == pytest.approx(0.02)
    assert row.errors == {"404": 1}
    later = stats.rows(["legal"], set(), now=t0 + LATENCY_WINDOW_S + 20)["legal"]
    assert later.requests_per_s == 0 and later.ttft_p50 is None and later.requests == 21  # totals stay


def test_tenant_rows_are_bounded() -> None:
    stats = TenantStats(max_tenants=3)
    for name in ("a", "b", "c", "d"):
        stats.window(name).finished("200", 1, None, now=1.0)
    assert stats.existing("a") is None and stats.existing("d") is not None  # the least recently active went
    w = stats.window("b")
    for i in range(3 * LATENCY_SAMPLES):
        w.first_token(float(i), now=2.0)
    assert stats.rows(["b", "c", "d"], set(), now=2.0)["b"].ttft_p50 == pytest.approx(2.5 * LATENCY_SAMPLES, abs=1)
    # "c" and "d" unregistered since: dropped; "y" without traffic has no row, "x" (shown: requests queued) zeros.
    rows = stats.rows(["b", "x", "y"], {"x"}, now=2.0)
    assert set(rows) == {"b", "x"} and rows["x"].requests == 0
    assert stats.existing("c") is None and stats.existing("x") is None


def _seq(prompt: int, computed: int, n: int, adapter: AdapterKey | None, output: int = 0) -> ScheduledSeq:
    req = Request("r", list(range(prompt)), SamplingParams(), adapter, 0.0, output_token_ids=[1] * output)
    req.num_computed_tokens = computed
    return ScheduledSeq(req, n)


def test_step_log_splits_prefill_and_decode_per_adapter() -> None:
    log = StepLog("base", steps_kept=4, seconds_kept=3)
    legal = AdapterKey("legal", "2")
    seqs = [_seq(40, 0, 16, legal),  # a prompt chunk
            _seq(40, 39, 1, legal),  # the last prompt token (the rest came from the prefix cache): prefill
            _seq(40, 42, 1, legal, output=3),  # decoding
            _seq(10, 12, 1, None, output=3),  # the base model, decoding
            _seq(10, 0, 13, None, output=3)]  # preempted, recomputing prompt and output: prefill
    assert log.record(seqs, 0.01, kv_blocks_used=7, queue_depth=2) == 32
    step = log.history().steps[-1]
    assert step.tokens == {"legal": (17, 1), "base": (13, 1)}
    assert (step.num_seqs, step.kv_blocks_used, step.queue_depth) == (5, 7, 2)
    for _ in range(10):
        log.record(seqs[2:3], 0.01, 1, 0)
    h = log.history()
    assert len(h.steps) == 4 and len(h.throughput) <= 3  # fixed-size rings
    assert sum(p.decode_tokens for p in h.throughput) + sum(p.prefill_tokens for p in h.throughput) == 42


def test_tier_view_shows_slots_host_and_pins(tmp_path: Path) -> None:
    def load(name: str, path: Path) -> AdapterWeights:
        return AdapterWeights(name, path, rank=int(path.name))

    mgr = AdapterManager(AdapterRegistry(), num_slots=3, host_capacity=2, loader=load)
    for name, rank in (("a", 4), ("b", 8), ("c", 16)):
        (tmp_path / str(rank)).mkdir()
        mgr.register(AdapterSpec(name), tmp_path / str(rank), persistent=False)
    a, c = AdapterKey("a", "1"), AdapterKey("c", "1")
    mgr.acquire(c)
    assert mgr.take_slot(c) is not None
    mgr.pin("b")  # b's weights were evicted from the 2-entry host cache: loaded back in the background
    mgr.wait()
    mgr.poll()
    view = mgr.tiers()
    assert view.host_capacity == 2 and view.loading == []
    assert view.slots[0] is not None and (view.slots[0].name, view.slots[0].rank, view.slots[0].refcount) == ("c", 16, 1)
    assert view.slots[1] is None and view.slots[2] is None
    host = {r.name: r for r in view.host}
    assert set(host) == {"b", "c"} and host["b"].pinned and host["c"].refcount == 1 and not host["c"].pinned
    assert a not in mgr.host
    mgr.shutdown()


def _engine_stats(replica: str | None, slot: ResidentAdapter | None, queued: int, second: int) -> EngineStats:
    adapters = AdapterStats(loads={"host": 1, "device": 1}, load_failures=0, load_latency={"host": Histogram()},
                            hits={"device": 2}, misses={"device": 1}, evictions={}, resident={"device": 1},
                            loading=0, slot_refs=0, queued={}, running={})
    prefix = PrefixCacheSnapshot(True, cached_blocks=3, evictions=0, queries={"base": 10}, hits={"base": 5})
    snap = EngineSnapshot(waiting=queued, running=1, last_step_tokens=4, kv_blocks_free=6, kv_blocks_total=10,
                          adapters=adapters, prefix_cache=prefix)
    tiers = TierView(slots=[slot, None], host=[ResidentAdapter("h", "1", 4, 0, False)], host_capacity=4, loading=[])
    batch = BatchHistory([StepRecord(second + 0.5, 0.01, 1, {"base": (0, 1)}, 4, queued)],
                         [ThroughputPoint(second, 3, 7, 1), ThroughputPoint(second + 1, 0, 1, 1)])
    return EngineStats(snap, tiers, batch, {"base": queued}, {"base": 1}, replica)


class _Engine:
    """The model facts stats_json reads from an EngineClient."""

    facts = EngineFacts("base", Path("base"), 512, 16, 8, "float32", "requested", "cpu",
                        MemoryPlan("none", 100, 200, 10, 16, 512, 8, 2), 5.0)


def test_stats_json_lists_each_replica_and_sums_the_cluster() -> None:
    """Two replicas' stats: counters and per-model counts summed, each slot, host entry and step says its
    replica, throughput summed per second, one `replicas` line each; one engine's JSON has no replica fields."""
    now = int(time.time())
    a, b = ResidentAdapter("x", "1", 8, 1, False), ResidentAdapter("y", "2", 4, 0, True)
    stats = [_engine_stats("r1", a, 2, now - 3), _engine_stats("r2", b, 1, now - 2)]
    engine = cast(EngineClient, _Engine())
    admin = KeyScope(frozenset({"*"}), admin=True)
    rows = tenant_rows(TenantStats(), engine, "base", combined(stats), [], admin)
    out = stats_json(engine, "base", 0.0, stats, [], rows, admin)
    assert out["model"]["replicas"] == 2 and out["model"]["prefix_cache"]["cached_blocks"] == 6
    assert out["tenants"][0]["queued"] == 3 and out["tenants"][0]["running"] == 2
    slots = [(s["replica"], s["slot"], s["name"]) for s in out["adapters"]["slots"]]
    assert slots == [("r1", 0, "x"), ("r1", 1, None), ("r2", 0, "y"), ("r2", 1, None)]
    assert [(e["replica"], e["name"]) for e in out["adapters"]["host"]["entries"]] == [("r1", "h"), ("r2", "h")]
    assert out["adapters"]["host"]["capacity"] == 8 and out["adapters"]["hits"] == {"device": 4}
    assert [s["replica"] for s in out["batch"]["steps"]] == ["r1", "r2"]  # by time
    assert [(p["t"], p["decode_tokens"]) for p in out["batch"]["throughput"]] == [
        (now - 3, 7), (now - 2, 8), (now - 1, 1)]
    assert out["batch"]["queue_depth"] == 3 and out["batch"]["kv_blocks_total"] == 20
    assert [(r["id"], r["adapter_slots_used"], r["tokens_per_s"]) for r in out["replicas"]] == [
        ("r1", 1, 1.1), ("r2", 1, 1.1)]
    one = stats_json(engine, "base", 0.0, [_engine_stats(None, a, 2, now)], [], rows, admin)
    assert "replicas" not in one and one["model"]["replicas"] == 1
    assert all("replica" not in s for s in [*one["adapters"]["slots"], *one["batch"]["steps"]])
    tenant = stats_json(engine, "base", 0.0, stats, [], rows, KeyScope(frozenset()))
    assert set(tenant) == {"object", "scope", "time", "model", "tenants", "fair_share"}


def test_each_key_has_its_own_window_and_the_admin_sees_all() -> None:
    """A tenant's window over every key and one per key: a key's rows never count another key's requests;
    a request counts as queued until its first token, then running, until it ends."""
    stats = TenantStats()
    for owner, n in (("key-a", 1), ("key-b", 3)):
        for _ in range(n):
            for w in (stats.window("shared"), stats.window("shared", owner)):
                w.finished("200", prompt_tokens=10, tpot=None, now=1.0, cached_tokens=5)
    stats.window("shared", "key-b").waiting += 1
    assert stats.rows(["shared"], set(), now=1.0)["shared"].requests == 4
    assert stats.rows(["shared"], set(), now=1.0, owner="key-a")["shared"].requests == 1
    b = stats.rows(["shared"], set(), now=1.0, owner="key-b")["shared"]
    assert b.requests == 3 and b.waiting == 1 and b.cached_tokens == 15
    assert stats.rows(["shared"], set(), now=1.0, owner="key-c") == {}  # no traffic of its own: no row
    assert stats.rows([], set(), now=1.0) == {} and stats.existing("shared", "key-b") is None  # unregistered: gone
