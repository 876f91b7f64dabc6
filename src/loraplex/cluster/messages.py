"""What crosses Ray Serve's handles between the ingress, the engine replicas and the board: plain picklable data.
No Ray, no torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraplex.adapters.key import AdapterKey
from loraplex.engine.client import ReplicaView
from loraplex.engine.outputs import EngineSnapshot, EngineStats


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """The first item of every generate stream, once the engine admitted the request: where it landed, whether
    its adapter version was already in that replica's memory (a routing hit) or had to be loaded (a miss; always a
    hit for the base), and that version."""

    replica: str
    resident: bool
    adapter: AdapterKey | None  # the version the request was admitted on (None: the base model)
    kept: bool = True  # the replica claims the adapter; False: served on a transient copy (cluster/admission.py)


@dataclass(slots=True)
class ReplicaReport:
    """A replica's state, pushed to the board every report interval and after each registry change."""

    view: ReplicaView
    stats: EngineStats  # its dashboard view (replica = view.id), snapshot lean: /metrics and /v1/stats read it
    actor_name: str  # the Ray actor (namespace "serve"): operators and tests can find it
    served: dict[str, int] = field(default_factory=dict)  # model label -> requests this replica took
    acked: int = -1  # the last board command this replica ran (-1: none yet)
    last_result: int = 0  # what that command returned (prefix-cache blocks dropped)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self.stats.snapshot


def lean(stats: EngineStats, replica: str) -> EngineStats:
    """The stats of `replica` without the latency samples kept for benchmarks (up to 100k floats per tier): the
    bucket counts are what /metrics needs, and a report crosses the network several times a second."""
    a = stats.snapshot.adapters
    hists = {t: replace(h, samples=[]) for t, h in a.load_latency.items()}
    return replace(stats, snapshot=replace(stats.snapshot, adapters=replace(a, load_latency=hists)), replica=replica)
