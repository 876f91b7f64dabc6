"""What crosses Ray Serve's handles between the ingress, the engine replicas and the board: plain picklable data.
No Ray, no torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.adapters.key import AdapterKey
from loraplex.adapters.metrics import Histogram
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
    """The first item of every generate stream, once the engine admitted the request: where it landed, whether
    its adapter version was already in that replica's memory (a routing hit) or had to be loaded (a miss; always a
    hit for the base), and that version."""

    replica: str
    resident: bool
    adapter: AdapterKey | None  # the version the request was admitted on (None: the base model)


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
    return _total(snapshots) if snapshots else None


def _total(values: list[Any]) -> Any:
    """Field by field: numbers summed, flags or-ed, dicts key by key, histograms bucket by bucket."""
    first = values[0]
    if isinstance(first, bool):
        return any(values)
    if isinstance(first, (int, float)):
        return sum(values)
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _total([v[k] for v in values if k in v]) for k in keys}
    if isinstance(first, Histogram):
        return replace(first, counts=[sum(c) for c in zip(*(h.counts for h in values))],
                       total=sum(h.total for h in values), n=sum(h.n for h in values), samples=[])
    if is_dataclass(first):
        return replace(first, **{f.name: _total([getattr(v, f.name) for v in values]) for f in fields(first)})
    return first
