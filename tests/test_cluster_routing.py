"""The ingress's routing rule, without Ray: an adapter's requests carry its id (affinity) until the adapter is
hot or its holders are busier than the idlest replica; then one goes by queue length, claimed where it lands only
when the adapter is hot. A popular adapter gets a second holder where there is room. Dead replicas drop out."""

from __future__ import annotations

from loraplex.cluster.admission import Popularity
from loraplex.cluster.messages import RouteInfo
from loraplex.cluster.routing import AdapterRouting, Dispatch


def _start(r: AdapterRouting, adapter: str | None, replica: str, resident: bool = True) -> RouteInfo:
    r.dispatch(adapter)
    route = RouteInfo(replica, resident, None)
    r.started(adapter, adapter or "base", route)
    return route


def test_affinity_until_the_adapter_is_hot() -> None:
    r = AdapterRouting(hot_threshold=2, spill_margin=100, live={"A", "B"})
    assert r.dispatch("legal") == Dispatch("legal", True)  # pending: counts before its replica is known
    r.abandoned("legal")
    first = _start(r, "legal", "A", resident=False)
    _start(r, "legal", "A")
    assert r.dispatch("legal") == Dispatch("", True)  # 2 in flight on its one replica: hot, claimed where it lands
    r.abandoned("legal")
    _start(r, "legal", "B", resident=False)  # the spilled request's replica claims it: now 2 replicas run it
    assert r.dispatch("legal").model_id == "legal"  # 3 in flight, threshold 2 x 2 replicas
    assert r.results == {"hit": 1, "miss": 2, "spill": 2}  # the request sent to B was a spill too
    r.finished("legal", first)
    assert r.in_flight["legal"] == {"A": 1, "B": 1} and r.load == {"A": 1, "B": 1}


def test_an_adapter_keeping_its_holder_busy_spills_and_dead_replicas_drop_out() -> None:
    r = AdapterRouting(hot_threshold=100, spill_margin=2, live={"A", "B"})
    _start(r, "poetry", "A")
    _start(r, None, "A")  # the base model's requests load the replica too
    _start(r, None, "A")
    assert r.dispatch("poetry").model_id == "poetry"  # A runs 3, B none, but not because of poetry: no cold copy on B
    r.abandoned("poetry")
    _start(r, "legal", "A")
    _start(r, "legal", "A")
    # legal keeps A busy (2 of A's 5): the next one goes by queue length, on a transient copy where it lands
    assert r.dispatch("legal") == Dispatch("", False)
    r.abandoned("legal")
    assert r.dispatch("novel") == Dispatch("novel", True)  # no holder known: Ray's multiplexing places it
    r.abandoned("novel")
    r.set_live({"A"})  # B died: A is the idlest there is
    assert r.dispatch("legal").model_id == "legal" and r.holders["legal"] == {"A"}
    assert AdapterRouting(1, 1, affinity=False).dispatch("legal") == Dispatch("", True)  # comparison mode: no id


def test_a_popular_adapter_gets_a_second_holder_where_there_is_room() -> None:
    r = AdapterRouting(hot_threshold=100, spill_margin=100, live={"A", "B"}, popularity=Popularity(60.0),
                       replicate_share=0.25)
    for i in range(3):  # 3 of 4 recent requests are legal's: a share of 0.75, three holders' worth, two replicas
        r.requested("poetry" if i == 0 else "legal", 0.0)
    count = r.requested("legal", 0.0)
    assert r.popularity is not None and r.popularity.share(count) == 0.75
    _start(r, "legal", "A")
    assert r.dispatch("legal", count) == Dispatch("", True)  # A runs 1, B none: B may claim it
    r.abandoned("legal")
    _start(r, "poetry", "B")
    _start(r, "poetry", "B")
    assert r.dispatch("legal", count).model_id == "legal"  # B is busier than A: the holder it is
    r.abandoned("legal")
    assert r.dispatch("poetry", 0.5).model_id == "poetry"  # B busier, but a share of 0.125 earns no second holder
    r.abandoned("poetry")
    for _ in range(3):
        _start(r, None, "A")
    r.dispatch("legal", count)  # A busier again: the replicating request lands on B, which claims legal
    r.started("legal", "legal", RouteInfo("B", False, None))
    assert r.holders["legal"] == {"A", "B"} and r.results["replicate"] == 2
    assert r.dispatch("legal", count).model_id == "legal"  # both hold it: Ray chooses between them by queue length
    r.set_live({"A"})
    assert r.dispatch("legal", count).model_id == "legal"  # one replica: no more copies to make
    counts = Popularity(60.0)
    never = AdapterRouting(100, 100, live={"A", "B"}, popularity=counts, replicate_share=2.0)
    _start(never, "legal", "A")
    assert never.dispatch("legal", counts.hit("legal", 0.0)).model_id == "legal"  # a share above 1: never
