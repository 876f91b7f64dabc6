"""The ingress's cluster series on /metrics, beside the server's own (whose engine gauges and counters are the
replicas' totals): where requests were routed and whether their adapter was already there, and each replica's
state from its latest report (residency per adapter, loads, requests taken, queue)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from loraplex.cluster.remote_engine import RemoteEngine


class ClusterCollector:
    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        routing, reports = self.engine.routing, self.engine.reports
        yield GaugeMetricFamily("loraplex_cluster_replicas", "Engine replicas reporting", value=len(reports))
        results = CounterMetricFamily("loraplex_cluster_routing", "Adapter requests by routing result: hit (the "
                                      "replica held the adapter), miss (it had to load it), spill (sent by queue "
                                      "length: its holders were hot or busy), replicate (sent by queue length for "
                                      "one more replica to claim a popular adapter), transient (served without "
                                      "claiming the adapter: rarer than the claim it would evict)", labels=["result"])
        for result in ("hit", "miss", "spill", "replicate", "transient"):
            results.add_metric([result], routing.results[result])
        yield results
        routed = CounterMetricFamily("loraplex_cluster_routed_requests", "Requests the ingress sent, by replica and "
                                     "model", labels=["replica", "model"])
        for (replica, model), n in sorted(routing.routed.items()):
            routed.add_metric([replica, model], n)
        yield routed
        served = CounterMetricFamily("loraplex_replica_requests", "Requests each replica took, by model (its report)",
                                     labels=["replica", "model"])
        resident = GaugeMetricFamily("loraplex_replica_adapter_resident", "Adapter versions held by each replica "
                                     "(value 1), by tier", labels=["replica", "adapter", "tier"])
        counts = GaugeMetricFamily("loraplex_replica_adapters_resident", "Adapters each replica holds, by tier",
                                   labels=["replica", "tier"])
        loads = CounterMetricFamily("loraplex_replica_adapter_loads", "Adapter loads per replica (host: from disk, "
                                    "a cold load; device: into a slot)", labels=["replica", "tier"])
        queue = GaugeMetricFamily("loraplex_replica_requests_in_engine", "Requests running or waiting in each "
                                  "replica's engine", labels=["replica", "state"])
        for r in reports:
            rid, snap = r.view.id, r.snapshot
            for model, n in sorted(r.served.items()):
                served.add_metric([rid, model], n)
            for key, tiers in sorted(r.view.resident.items()):
                for tier in tiers:
                    resident.add_metric([rid, str(key), tier], 1)
            for tier, n in snap.adapters.resident.items():
                counts.add_metric([rid, tier], n)
            for tier, n in snap.adapters.loads.items():
                loads.add_metric([rid, tier], n)
            queue.add_metric([rid, "running"], snap.running)
            queue.add_metric([rid, "waiting"], snap.waiting)
        yield from (served, resident, counts, loads, queue)
