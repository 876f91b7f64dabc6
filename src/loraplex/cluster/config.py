"""ClusterConfig: how many engine replicas, where Ray runs, and the routing rules. No Ray, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.errors import InvalidRequestError

CLAIM_POLICIES = ("frequency", "lru")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    replicas: int = 2
    ray_address: str | None = None  # None: start a Ray instance on this machine
    cpus_per_replica: float = 1.0  # Ray's num_cpus per engine replica (fractional on small machines)
    max_adapters_per_replica: int = 32  # adapters a replica claims for routing (Ray Serve's multiplexed models)
    # Requests in flight for one adapter, per replica running it, beyond which the next one is routed by queue
    # length alone (Ray's power of two choices) instead of to the replicas holding it: the replica it lands on
    # claims the adapter too, so a hot adapter spreads over several replicas instead of queueing on one.
    hot_adapter_threshold: int = 16
    # Requests in flight by which the least loaded replica holding an adapter may exceed the least loaded replica
    # before the adapter's next request goes by queue length (and so, usually, to a replica that claims it too).
    spill_margin: int = 2
    affinity: bool = True  # False: no adapter id reaches Ray, every request goes by queue length (for comparison)
    # "frequency": a replica claims an adapter only if it is more popular than the claim Ray would evict for it
    # (cluster/admission.py); "lru": every request claims its adapter (Ray Serve's plain multiplexing).
    claim_policy: str = "frequency"
    popularity_half_life_s: float = 120.0  # how fast an adapter's request count decays (admission, replication)
    # The share of the recent requests that earns an adapter one more replica holding it (cluster/routing.py): the
    # most requested adapters are then routed by queue length between their holders, which balances the load.
    replicate_share: float = 0.1
    app_name: str = "loraplex"
    report_interval: float = 0.25  # seconds between a replica's reports to the board (and its command polls)

    def __post_init__(self) -> None:
        checks = [
            (self.replicas >= 1, "replicas must be >= 1"),
            (self.cpus_per_replica > 0, "cpus_per_replica must be > 0"),
            (self.max_adapters_per_replica >= 1, "max_adapters_per_replica must be >= 1"),
            (self.hot_adapter_threshold >= 1, "hot_adapter_threshold must be >= 1"),
            (self.spill_margin >= 1, "spill_margin must be >= 1"),
            (self.report_interval > 0, "report_interval must be > 0"),
            (self.claim_policy in CLAIM_POLICIES, f"claim_policy must be one of {', '.join(CLAIM_POLICIES)}"),
            (self.popularity_half_life_s > 0, "popularity_half_life_s must be > 0"),
            (self.replicate_share > 0, "replicate_share must be > 0 (above 1: never replicate)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
