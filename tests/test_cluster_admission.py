"""Claim admission (cluster/admission.py): request counts that halve every half-life, a replica that claims a new
adapter only when it is more popular than the claim Ray would evict, the ingress sending an unclaimed adapter by
queue length, and what the rule does to cold loads on the benchmark's Zipf stream (simulated). No Ray, no model."""

from __future__ import annotations

import random

import pytest

from benchmarks.cluster_sim import expected_on, zipf_weights
from loraplex.cluster.admission import ClaimAdmission, Popularity
from loraplex.cluster.config import ClusterConfig
from loraplex.cluster.messages import RouteInfo
from loraplex.cluster.routing import AdapterRouting
from loraplex.errors import InvalidRequestError


def test_popularity_counts_requests_halving_every_half_life() -> None:
    p = Popularity(half_life_s=10.0)
    assert p.hit("legal", 0.0) == 1.0 and p.hit("legal", 0.0) == 2.0
    assert p.hit("legal", 10.0) == pytest.approx(2.0)  # 2 halved, plus this request
    assert p.hit("poetry", 10.0) == 1.0
    assert p.total == (pytest.approx(3.0), 10.0)  # legal's 2 halved, its third request and poetry's: a share each
    assert p.share(1.0) == pytest.approx(1 / 3)
    for i in range(4096):  # every 4,096 requests, counts decayed to nothing are forgotten
        p.hit("sql", 1000.0 + i * 1e-6)
    assert set(p.counts) == {"sql"}


def test_a_replica_claims_a_new_adapter_only_if_it_beats_the_claim_ray_would_evict() -> None:
    a = ClaimAdmission(capacity=2, half_life_s=10.0)
    assert a.admit("legal", 1.0, 0.0)  # room: every adapter is claimed
    a.claimed("legal", 5.0, 0.0)
    a.claimed("poetry", 1.0, 0.0)
    a.claimed("legal", 6.0, 0.0)  # legal touched: poetry is now the least recently used claim
    assert a.admit("legal", 1.0, 0.0) and a.admit("poetry", 0.5, 0.0)  # claimed already: always
    assert a.holds("poetry") and not a.holds("sql")
    assert not a.admit("sql", 1.0, 0.0)  # no more popular than poetry (1.0): served on a transient copy
    assert a.admit("sql", 1.0, 10.0)  # poetry's count has halved since
    assert a.admit("sql", None, 0.0)  # no count sent (claim policy lru): claim
    a.unclaimed("poetry")  # Ray's LRU dropped it
    assert list(a.claims) == ["legal"] and a.admit("sql", 0.1, 0.0)


def test_the_ingress_counts_requests_and_sends_an_unclaimed_adapter_by_queue_length() -> None:
    r = AdapterRouting(hot_threshold=100, spill_margin=100, live={"A", "B"}, popularity=Popularity(60.0))
    assert r.requested("legal", 0.0) == 1.0 and r.requested(None, 0.0) is None
    assert r.dispatch("legal").model_id == "legal"
    r.started("legal", "legal", RouteInfo("A", False, None, kept=False))  # A served it without claiming it
    assert r.results == {"miss": 1, "transient": 1} and r.unclaimed == {"legal"}
    assert r.dispatch("legal") == ("", True)  # claimed nowhere: Ray would only wait for a holder
    r.started("legal", "legal", RouteInfo("B", False, None))  # B claimed it
    assert r.unclaimed == set() and r.dispatch("legal").model_id == "legal" and r.holders["legal"] == {"B"}
    r.started("legal", "legal", RouteInfo("A", False, None, kept=False), claim=False)  # a busy spill's copy on A
    assert r.unclaimed == set() and r.holders["legal"] == {"B"}  # still claimed by B alone
    r.started("legal", "legal", RouteInfo("A", False, None, kept=False))  # A declined a hot spill: B still holds it
    assert r.unclaimed == set() and r.dispatch("legal").model_id == "legal"
    assert AdapterRouting(1, 1).requested("legal", 0.0) is None  # no popularity kept: no counts
    assert AdapterRouting(1, 1, affinity=False, popularity=Popularity(60.0)).requested("legal", 0.0) is None


def test_config_names_a_bad_claim_policy() -> None:
    with pytest.raises(InvalidRequestError, match="claim_policy must be one of frequency, lru"):
        ClusterConfig(claim_policy="lfu")
    with pytest.raises(InvalidRequestError, match="popularity_half_life_s"):
        ClusterConfig(popularity_half_life_s=0)
    with pytest.raises(InvalidRequestError, match="replicate_share must be > 0"):
        ClusterConfig(replicate_share=0)


def test_admission_cuts_cold_loads_on_the_benchmarks_stream() -> None:
    """The benchmark's stream (Zipf over 64 adapters, 2 replicas x 24): claim admission loads fewer adapters
    than Ray's plain LRU of claims, and more than 3x fewer than routing by queue length, also when popular adapters
    are held twice."""
    indices = random.Random(1).choices(range(64), weights=zipf_weights(64, 1.0), k=1500)
    queue, lru, frequency = (expected_on(p, indices, 64, 2, 24, 500, trials=10) for p in ("queue", "affinity", "frequency"))
    assert frequency < 0.9 * lru and queue / frequency > 3.5
    # Two holders for the adapters with 10% of the traffic each cost the long tail their places: still > 3x.
    replicated = expected_on("frequency", indices, 64, 2, 24, 500, trials=10, replicate_share=0.1)
    assert frequency < replicated and queue / replicated > 3.0
