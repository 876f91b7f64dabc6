"""Placement of adapters over replicas, simulated: what Ray Serve's multiplexed routing (a request goes to a
replica holding its adapter; an adapter no replica holds goes to one with the fewest; each replica keeps an LRU
of its claims), the same with loraplex's claim admission (a replica claims an adapter only if it is more popular
than the claim it would evict: cluster/admission.py, the very classes, with the request index as the clock), each
optionally with the ingress's replication of popular adapters (cluster/routing.py's `holders_wanted`; which replica
has room is modelled as uniform) and routing by queue length alone (any replica: modelled as uniform) do to cold
loads, under Zipf popularity. Used by benchmarks/cluster.py to say what the measured 2-replica figures predict for a
larger cluster. Pure Python: no engine, no Ray."""

from __future__ import annotations

import random
from dataclasses import dataclass

from loraplex.cluster.admission import ClaimAdmission, Popularity
from loraplex.cluster.routing import holders_wanted

# The benchmark's default half-life in requests: ClusterConfig's 120 s at its 5 requests per second.
HALF_LIFE_REQUESTS = 600.0


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


@dataclass(frozen=True, slots=True)
class Placement:
    policy: str
    adapters: int
    replicas: int
    capacity: int  # adapters a replica holds (its host tier = its multiplexed claims)
    requests: int
    loads: int  # cold loads (disk -> host), all replicas
    loads_per_replica: list[int]
    hit_rate: float  # requests whose replica already held the adapter

    @property
    def loads_per_1000(self) -> float:
        return 1000 * self.loads / self.requests


def simulate(policy: str, adapters: int, replicas: int, capacity: int, requests: int, zipf_s: float,
             warmup: int = 0, seed: int = 0, half_life: float = HALF_LIFE_REQUESTS,
             replicate_share: float | None = None) -> Placement:
    """policy: "affinity" (multiplexed routing, LRU claims), "frequency" (the same, with claim admission; counts
    halve every `half_life` requests) or "queue" (no adapter id: uniform over replicas); `replicate_share`: an adapter
    with that share of the recent requests gets one more holder per share (None: never). The first `warmup` requests
    fill the caches and are not counted: the figures are the steady state's."""
    rng = random.Random(seed)
    stream = rng.choices(range(adapters), weights=zipf_weights(adapters, zipf_s), k=warmup + requests)
    return place(policy, stream, adapters, replicas, capacity, warmup, rng, half_life, replicate_share)


def place(policy: str, stream: list[int], adapters: int, replicas: int, capacity: int, warmup: int,
          rng: random.Random, half_life: float = HALF_LIFE_REQUESTS,
          replicate_share: float | None = None) -> Placement:
    """The placement of one request stream (adapter indices), as `simulate` describes; `rng` breaks ties. Each
    replica's claims (`ClaimAdmission.claims`, least recently used first) are its cache."""
    popularity = Popularity(half_life)
    replicas_claims = [ClaimAdmission(capacity, half_life) for _ in range(replicas)]
    loads = [0] * replicas
    hits = 0
    for i, a in enumerate(stream):
        if i == warmup:
            loads, hits = [0] * replicas, 0
        name = str(a)
        counted = popularity.hit(name, i)
        count = counted if policy == "frequency" else None
        if policy in ("affinity", "frequency"):
            holders = [r for r, c in enumerate(replicas_claims) if c.holds(name)]
            copies = 1 if replicate_share is None else holders_wanted(popularity.share(counted), replicate_share,
                                                                      replicas)
            if holders and len(holders) < copies:
                r = rng.randrange(replicas)  # by queue length: wherever there is room, claimed there
            elif holders:
                r = rng.choice(holders)
            else:
                fewest = min(len(c.claims) for c in replicas_claims)
                r = rng.choice([j for j, c in enumerate(replicas_claims) if len(c.claims) == fewest])
        else:
            r = rng.randrange(replicas)
        claims = replicas_claims[r]
        if claims.holds(name):
            hits += 1
        else:
            loads[r] += 1
            if not claims.admit(name, count, i):
                continue  # served on a transient copy: nothing evicted, nothing kept
        claims.claimed(name, count, i)
        if len(claims.claims) > capacity:
            claims.unclaimed(next(iter(claims.claims)))  # Ray's LRU evicts its least recently used claim
    requests = len(stream) - warmup
    return Placement(policy, adapters, replicas, capacity, requests, sum(loads), loads, hits / requests)


def expected_on(policy: str, stream: list[int], adapters: int, replicas: int, capacity: int, warmup: int,
                trials: int = 50, half_life: float = HALF_LIFE_REQUESTS, replicate_share: float | None = None) -> float:
    """Loads per 1,000 requests that the policy's ideal placement gives on exactly this stream (the mean over
    `trials` tie-breaks): what a measured run of a few hundred requests should be compared with."""
    runs = [place(policy, stream, adapters, replicas, capacity, warmup, random.Random(t), half_life, replicate_share)
            for t in range(trials)]
    return sum(r.loads_per_1000 for r in runs) / trials
