"""What crosses Ray Serve's handles between the ingress, the engine replicas and the board: plain picklable data.
No Ray, no torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters.metrics import AdapterStats
from loraplex.engine.outputs import EngineSnapshot, ReplicaView

if TYPE_CHECKING:
    from loraplex.engine.memory import MemoryPlan
    from loraplex.hardware import DtypeChoice


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """The base model's facts, fixed at start, the same on every replica: what the ingress serves under."""

    model_name: str
    model_dir: Path
    max_model_len: int
    block_size: int
    max_num_seqs: int
    dtype: DtypeChoice
    device: str
    memory: MemoryPlan


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """The first item of every generate stream: where the request landed, and whether its adapter version was
    already in that replica's memory (a routing hit) or had to be loaded (a miss; always a hit for the base)."""

    replica: str
    resident: bool


@dataclass(slots=True)
class ReplicaReport:
    """A replica's state, pushed to the board every report interval and after each registry change."""

    view: ReplicaView
    snapshot: EngineSnapshot
    actor_name: str  # the Ray actor (namespace "serve"): operators and tests can find it
    served: dict[str, int] = field(default_factory=dict)  # model label -> requests this replica took
    acked: int = -1  # the last board command this replica ran (-1: none yet)
    last_result: int = 0  # what that command returned (prefix-cache blocks dropped)


def lean(snapshot: EngineSnapshot) -> EngineSnapshot:
    """The snapshot without the latency samples kept for benchmarks (up to 100k floats per tier): the bucket
    counts are what /metrics needs, and a report crosses the network several times a second."""
    a = snapshot.adapters
    hists = {t: replace(h, samples=[]) for t, h in a.load_latency.items()}
    return replace(snapshot, adapters=replace(a, load_latency=hists))


def merge(snapshots: list[EngineSnapshot]) -> EngineSnapshot | None:
    """The cluster's totals: counters, gauges and histogram buckets summed over the replicas."""
    if not snapshots:
        return None
    first = snapshots[0]

    def total(dicts: list[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in dicts:
            for k, v in d.items():
                out[k] = out.get(k, 0) + v
        return out

    stats = [s.adapters for s in snapshots]
    latency = {}
    for tier, h in first.adapters.load_latency.items():
        hs = [s.load_latency[tier] for s in stats if tier in s.load_latency]
        latency[tier] = replace(h, counts=[sum(c) for c in zip(*(x.counts for x in hs))], total=sum(x.total for x in hs),
                                n=sum(x.n for x in hs), samples=[])
    adapters = AdapterStats(
        loads=total([s.loads for s in stats]), load_failures=sum(s.load_failures for s in stats), load_latency=latency,
        hits=total([s.hits for s in stats]), misses=total([s.misses for s in stats]),
        evictions=total([s.evictions for s in stats]), resident=total([s.resident for s in stats]),
        loading=sum(s.loading for s in stats), queued=total([s.queued for s in stats]),
        running=total([s.running for s in stats]))
    pcs = [s.prefix_cache for s in snapshots]
    prefix = replace(first.prefix_cache, enabled=any(p.enabled for p in pcs), cached_blocks=sum(p.cached_blocks for p in pcs),
                     evictions=sum(p.evictions for p in pcs), queries=total([p.queries for p in pcs]),
                     hits=total([p.hits for p in pcs]))
    return EngineSnapshot(waiting=sum(s.waiting for s in snapshots), running=sum(s.running for s in snapshots),
                          last_step_tokens=sum(s.last_step_tokens for s in snapshots),
                          kv_blocks_free=sum(s.kv_blocks_free for s in snapshots),
                          kv_blocks_total=sum(s.kv_blocks_total for s in snapshots), adapters=adapters,
                          prefix_cache=prefix)
