"""The JSON of GET /v1/stats, from the engines' stats, the adapter catalog and the per-tenant windows.

Behind a cluster there is one EngineStats per replica: counters and per-model counts are summed, device slots,
host entries and steps are listed with the `replica` they are on, throughput is summed per second, and
`replicas` has one line per replica. One engine's JSON has no `replica` fields and no `replicas` list.
An admin key (or an open server) gets every section; a tenant key gets the base model's facts and its own rows:
the traffic of that key alone on the models it may use (queued, running, rates, latencies, cache hits), nothing
that names another tenant or counts another key's requests (docs/dashboard.md; docs/security.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from loraplex import __version__
from loraplex.engine.client import AdapterInfo, EngineClient
from loraplex.engine.outputs import EngineStats
from loraplex.server.stats.totals import summed
from loraplex.server.auth import KeyScope
from loraplex.server.stats.shares import SHARE_WINDOW_S, ShareRow
from loraplex.server.stats.tenants import TenantRow, TenantStats

RATE_S = 10  # a replica's tokens_per_s: over its last seconds of throughput


def combined(stats: list[EngineStats]) -> EngineStats:
    """The engines' snapshot and per-model request counts summed (tiers and batch: the first's; the per-engine
    parts are read from the list)."""
    if len(stats) == 1:
        return stats[0]
    return replace(stats[0], snapshot=summed([s.snapshot for s in stats]), queued=summed([s.queued for s in stats]),
                   running=summed([s.running for s in stats]), replica=None)


def _on(stats: EngineStats) -> dict[str, str]:
    """The `replica` field of an entry: present only behind a cluster."""
    return {} if stats.replica is None else {"replica": stats.replica}


def _model(engine: EngineClient, served_name: str, stats: EngineStats, started: float,
           replicas: int, admin: bool) -> dict[str, Any]:
    """`memory` is one engine's plan (every replica has the same); the prefix cache is summed over `replicas`
    (its hit rate and size count every key's prompts: admin only)."""
    mem, pc = engine.facts.memory, stats.snapshot.prefix_cache
    return {
        "id": served_name, "version": __version__, "started": started, "uptime_s": time.time() - started,
        "replicas": replicas,
        "dtype": engine.facts.dtype, "device": engine.facts.device, "quantization": mem.quantization,
        "max_model_len": engine.facts.max_model_len,
        "memory": {"weights_bytes": mem.weights, "kv_cache_bytes": mem.kv_cache, "adapter_slots_bytes": mem.adapters,
                   "adapter_slots": mem.adapter_slots, "kv_blocks": mem.kv_blocks, "block_size": mem.block_size,
                   "kv_tokens": mem.kv_tokens},
        "prefix_cache": {"enabled": pc.enabled, **({"hit_rate": pc.hit_rate, "cached_blocks": pc.cached_blocks}
                                                   if admin else {})},
    }


def _tenant(name: str, label: str, kind: str, row: TenantRow, stats: EngineStats | None) -> dict[str, Any]:
    """`label`: the name the engine counts the tenant under (the base model's own name for the base). With
    `stats` (the admin's view) queue, batch and cache hits are the engine's, over every key; without, they are the
    row's own: its key's requests in flight (before / after their first token) and its prompts' cached tokens."""
    if stats is not None:
        pc = stats.snapshot.prefix_cache
        queried = pc.queries.get(label, 0)
        queued, running = stats.queued.get(label, 0), stats.running.get(label, 0)
        hit_rate = pc.hits.get(label, 0) / queried if queried else None
    else:
        queued, running = row.waiting, row.streaming
        hit_rate = row.cached_tokens / row.prompt_tokens if row.prompt_tokens else None
    return {
        "tenant": name, "kind": kind, "queued": queued, "running": running,
        "requests_per_s": row.requests_per_s, "tokens_per_s": row.tokens_per_s, "requests": row.requests,
        "output_tokens": row.output_tokens,
        "prompt_tokens_mean": row.prompt_tokens / row.requests if row.requests else None,
        "prefix_cache_hit_rate": hit_rate,
        "ttft_p50_s": row.ttft_p50, "ttft_p99_s": row.ttft_p99, "tpot_p50_s": row.tpot_p50, "tpot_p99_s": row.tpot_p99,
        "errors": row.errors,
    }


def _adapters(stats: list[EngineStats], total: EngineStats, catalog: list[AdapterInfo]) -> dict[str, Any]:
    a = total.snapshot.adapters

    def resident(r: Any) -> dict[str, Any]:
        return {"name": r.name, "version": r.version, "rank": r.rank, "refcount": r.refcount, "pinned": r.pinned}

    return {
        "slots": [{"slot": i, **_on(s), **(resident(r) if r is not None else {"name": None})}
                  for s in stats for i, r in enumerate(s.tiers.slots)],
        "host": {"capacity": sum(s.tiers.host_capacity for s in stats),
                 "entries": [{**resident(r), **_on(s)} for s in stats for r in s.tiers.host]},
        "disk": [{"name": c.name, "current": c.current, "versions": list(c.versions), "pinned": c.pinned}
                 for c in catalog],
        "loading": [f"{name}@{version}" for s in stats for name, version in s.tiers.loading],
        "loads": a.loads, "load_failures": a.load_failures, "hits": a.hits, "misses": a.misses,
        "evictions": a.evictions,
        "load_seconds": {tier: {"buckets": list(h.buckets), "counts": list(h.counts), "count": h.n, "sum": h.total}
                         for tier, h in a.load_latency.items()},
    }


def _batch(stats: list[EngineStats], total: EngineStats) -> dict[str, Any]:
    s = total.snapshot
    steps = sorted(((e, r) for e in stats for r in e.batch.steps), key=lambda er: er[1].time)
    seconds: dict[int, list[int]] = {}  # unix second -> [prefill, decode, steps] over the engines
    for e in stats:
        for p in e.batch.throughput:
            acc = seconds.setdefault(p.second, [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + p.prefill_tokens, acc[1] + p.decode_tokens, acc[2] + p.steps
    return {
        "queue_depth": s.waiting, "running": s.running,
        "kv_blocks_used": s.kv_blocks_total - s.kv_blocks_free, "kv_blocks_total": s.kv_blocks_total,
        "steps": [{"t": r.time, **_on(e), "duration_s": r.duration, "batch_size": r.num_seqs,
                   "kv_blocks_used": r.kv_blocks_used, "queue_depth": r.queue_depth,
                   "tokens": {m: {"prefill": p, "decode": d} for m, (p, d) in r.tokens.items()}}
                  for e, r in steps],
        "throughput": [{"t": t, "prefill_tokens": p, "decode_tokens": d, "steps": n}
                       for t, (p, d, n) in sorted(seconds.items())],
    }


def _replicas(stats: list[EngineStats], now: float) -> list[dict[str, Any]]:
    """One line per cluster replica: its queue, KV cache, adapter tiers and recent tokens per second."""
    out = []
    for e in stats:
        s, tiers = e.snapshot, e.tiers
        recent = sum(p.prefill_tokens + p.decode_tokens for p in e.batch.throughput if p.second > now - RATE_S)
        out.append({"id": e.replica, "queue_depth": s.waiting, "running": s.running,
                    "kv_blocks_used": s.kv_blocks_total - s.kv_blocks_free, "kv_blocks_total": s.kv_blocks_total,
                    "adapter_slots_used": sum(r is not None for r in tiers.slots), "adapter_slots": len(tiers.slots),
                    "host_entries": len(tiers.host), "host_capacity": tiers.host_capacity,
                    "loading": [f"{name}@{version}" for name, version in tiers.loading],
                    "tokens_per_s": recent / RATE_S})
    return out


def tenant_rows(tenants: TenantStats, engine: EngineClient, served_name: str, stats: EngineStats,
                catalog: list[AdapterInfo], scope: KeyScope) -> dict[str, TenantRow]:
    """Rows for the base model, and for each registered adapter with traffic since start or requests now. An
    admin's rows count every key; a tenant key's only its own requests (its windows), and only its own traffic
    makes a row appear."""
    busy = {served_name}
    if scope.admin:
        for name in (*stats.queued, *stats.running):
            if stats.queued.get(name) or stats.running.get(name):
                busy.add(served_name if name == engine.facts.model_name else name)
    return tenants.rows([served_name, *(a.name for a in catalog)], busy, owner=None if scope.admin else scope.owner)


def fair_share_json(shares: dict[str, ShareRow], scope: KeyScope) -> dict[str, Any]:
    """The fair share's tenants: every one for an admin; for a tenant key its own row only, without the shares (the
    last minute's share and the weight's share each count the other tenants' traffic)."""
    if scope.admin:
        rows = list(shares.values())
    else:
        rows = [shares[scope.owner]] if scope.owner in shares else []
    own = {} if scope.admin else {"share": None, "weight_share": None}
    return {"window_s": SHARE_WINDOW_S, "tenants": [
        {"tenant": r.tenant, "weight": r.weight, "queued": r.queued, "running": r.running,
         "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "window_tokens": r.window_tokens,
         "share": r.share, "weight_share": r.weight_share, "throttled": r.throttled, "last_limit": r.last_limit,
         "last_throttled": r.last_throttled, **own} for r in rows]}


def stats_json(engine: EngineClient, served_name: str, started: float, stats: list[EngineStats],
               catalog: list[AdapterInfo], rows: dict[str, TenantRow], scope: KeyScope,
               shares: dict[str, ShareRow] | None = None) -> dict[str, Any]:
    """`stats`: engine.stats() (one per engine); `catalog`: engine.admin(ListAdapters()); `rows`: a TenantRow for the
    base model (served_name) and each adapter (tenant_rows over combined(stats), for this scope); `shares`: the
    fair share's tenants (server/stats/shares.py)."""
    total = combined(stats)
    tenants = []
    for name, row in rows.items():
        base = name == served_name
        if scope.may_use(None if base else name):
            tenants.append(_tenant(name, engine.facts.model_name if base else name, "base" if base else "adapter", row,
                                   total if scope.admin else None))
    now = time.time()
    out: dict[str, Any] = {"object": "stats", "scope": "admin" if scope.admin else "tenant", "time": now,
                           "model": _model(engine, served_name, total, started, len(stats), scope.admin),
                           "tenants": tenants, "fair_share": fair_share_json(shares or {}, scope)}
    if scope.admin:
        out["adapters"] = _adapters(stats, total, catalog)
        out["batch"] = _batch(stats, total)
        if any(e.replica is not None for e in stats):
            out["replicas"] = _replicas(stats, now)
    return out
