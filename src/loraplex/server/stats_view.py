"""The JSON of GET /v1/stats, from the engine's stats, the adapter catalog and the per-tenant windows.

An admin key (or an open server) gets every section; a tenant key gets the base model's facts and the rows of
the tenants it may use, nothing that names another tenant (README, "Dashboard").
"""

from __future__ import annotations

import time
from typing import Any

from loraplex import __version__
from loraplex.engine.async_engine import AdapterInfo
from loraplex.engine.client import EngineClient
from loraplex.engine.outputs import EngineStats
from loraplex.server.auth import KeyScope
from loraplex.server.tenant_stats import TenantRow, TenantStats


def _model(engine: EngineClient, served_name: str, stats: EngineStats, started: float) -> dict[str, Any]:
    mem, pc = engine.memory, stats.snapshot.prefix_cache
    return {
        "id": served_name, "version": __version__, "started": started, "uptime_s": time.time() - started,
        "dtype": engine.dtype.name, "device": engine.device, "quantization": mem.quantization,
        "max_model_len": engine.max_model_len,
        "memory": {"weights_bytes": mem.weights, "kv_cache_bytes": mem.kv_cache, "adapter_slots_bytes": mem.adapters,
                   "adapter_slots": mem.adapter_slots, "kv_blocks": mem.kv_blocks, "block_size": mem.block_size,
                   "kv_tokens": mem.kv_tokens},
        "prefix_cache": {"enabled": pc.enabled, "hit_rate": pc.hit_rate, "cached_blocks": pc.cached_blocks},
    }


def _tenant(name: str, label: str, kind: str, row: TenantRow, stats: EngineStats) -> dict[str, Any]:
    """`label`: the name the engine counts the tenant under (the base model's own name for the base)."""
    pc = stats.snapshot.prefix_cache
    queried = pc.queries.get(label, 0)
    return {
        "tenant": name, "kind": kind, "queued": stats.queued.get(label, 0), "running": stats.running.get(label, 0),
        "requests_per_s": row.requests_per_s, "tokens_per_s": row.tokens_per_s, "requests": row.requests,
        "output_tokens": row.output_tokens,
        "prompt_tokens_mean": row.prompt_tokens / row.requests if row.requests else None,
        "prefix_cache_hit_rate": pc.hits.get(label, 0) / queried if queried else None,
        "ttft_p50_s": row.ttft_p50, "ttft_p99_s": row.ttft_p99, "tpot_p50_s": row.tpot_p50, "tpot_p99_s": row.tpot_p99,
        "errors": row.errors,
    }


def _adapters(stats: EngineStats, catalog: list[AdapterInfo]) -> dict[str, Any]:
    a, tiers = stats.snapshot.adapters, stats.tiers

    def resident(r: Any) -> dict[str, Any]:
        return {"name": r.name, "version": r.version, "rank": r.rank, "refcount": r.refcount, "pinned": r.pinned}

    return {
        "slots": [{"slot": i, **(resident(r) if r is not None else {"name": None})} for i, r in enumerate(tiers.slots)],
        "host": {"capacity": tiers.host_capacity, "entries": [resident(r) for r in tiers.host]},
        "disk": [{"name": c.name, "current": c.current, "versions": list(c.versions), "pinned": c.pinned}
                 for c in catalog],
        "loading": [f"{name}@{version}" for name, version in tiers.loading],
        "loads": a.loads, "load_failures": a.load_failures, "hits": a.hits, "misses": a.misses,
        "evictions": a.evictions,
        "load_seconds": {tier: {"buckets": list(h.buckets), "counts": list(h.counts), "count": h.n, "sum": h.total}
                         for tier, h in a.load_latency.items()},
    }


def _batch(stats: EngineStats) -> dict[str, Any]:
    s, history = stats.snapshot, stats.batch
    return {
        "queue_depth": s.waiting, "running": s.running,
        "kv_blocks_used": s.kv_blocks_total - s.kv_blocks_free, "kv_blocks_total": s.kv_blocks_total,
        "steps": [{"t": r.time, "duration_s": r.duration, "batch_size": r.num_seqs, "kv_blocks_used": r.kv_blocks_used,
                   "queue_depth": r.queue_depth,
                   "tokens": {m: {"prefill": p, "decode": d} for m, (p, d) in r.tokens.items()}}
                  for r in history.steps],
        "throughput": [{"t": p.second, "prefill_tokens": p.prefill_tokens, "decode_tokens": p.decode_tokens,
                        "steps": p.steps} for p in history.throughput],
    }


def tenant_rows(tenants: TenantStats, engine: EngineClient, served_name: str, stats: EngineStats,
                catalog: list[AdapterInfo]) -> dict[str, TenantRow]:
    """Rows for the base model, and for each registered adapter with traffic since start or requests now."""
    busy = {served_name}
    for name in (*stats.queued, *stats.running):
        if stats.queued.get(name) or stats.running.get(name):
            busy.add(served_name if name == engine.model_name else name)
    return tenants.rows([served_name, *(a.name for a in catalog)], busy)


def stats_json(engine: EngineClient, served_name: str, started: float, stats: EngineStats,
               catalog: list[AdapterInfo], rows: dict[str, TenantRow], scope: KeyScope) -> dict[str, Any]:
    """`catalog`: engine.list_adapters(); `rows`: a TenantRow for the base model (served_name) and each adapter."""
    tenants = []
    for name, row in rows.items():
        base = name == served_name
        if scope.may_use(None if base else name):
            tenants.append(_tenant(name, engine.model_name if base else name, "base" if base else "adapter", row, stats))
    out: dict[str, Any] = {"object": "stats", "scope": "admin" if scope.admin else "tenant", "time": time.time(),
                           "model": _model(engine, served_name, stats, started), "tenants": tenants}
    if scope.admin:
        out["adapters"] = _adapters(stats, catalog)
        out["batch"] = _batch(stats)
    return out
