"""Prometheus metrics: per-adapter request counts, latency, TTFT and time per output token; queue depth,
batch size and KV blocks; the adapter cache. Engine state is read on the engine thread at scrape time.

Label cardinality is bounded: a series per adapter *name* (never per version, never a name a client made up),
for at most --max-metric-labels names; later names share the series model="other"."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from loraplex.engine.facts import MemoryPlan
from loraplex.engine.outputs import EngineSnapshot
from loraplex.server.stats.shares import Shares
from loraplex.server.stats.tenants import TenantStats

disable_created_metrics()  # the *_created series only add noise here

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


OTHER = "other"


class LabelGate:
    """The first `limit` distinct values of a label keep their own series; later ones map to "other". Bounded
    memory whatever clients send or however many adapters come and go."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()
        self._lock = threading.Lock()  # the event loop and the scrape path both call it

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._kept:
                return value
            if len(self._kept) < self.limit:
                self._kept.add(value)
                return value
            return OTHER

    def fold(self, values: dict[str, int]) -> dict[str, int]:
        """Per-name counts with the names beyond the limit summed under "other"."""
        out: dict[str, int] = {}
        for name, n in values.items():
            label = self(name)
            out[label] = out.get(label, 0) + n
        return out


class ServerMetrics:
    def __init__(self, memory: MemoryPlan, dtype: str, device: str, max_labels: int = 256) -> None:
        self.label = LabelGate(max_labels)  # applied to every model/adapter label
        self.memory = memory
        self.dtype = dtype  # what --dtype resolved to (hardware.resolve_dtype)
        self.device = device  # e.g. "AMD EPYC (AVX2)": the CPU class the dtype was resolved for
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Requests finished, by model/adapter and outcome",
                                ["model", "status"], registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "End-to-end request latency",
                                 ["model"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=_PER_TOKEN, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.tenant_label = LabelGate(max_labels)  # tenants: key ids (never the key), or adapters without keys
        self.shares = Shares()  # each fair-share tenant's books (bounded)
        self.tenants = TenantStats()  # the dashboard's per-model windows (bounded)
        self.snapshot: EngineSnapshot | None = None
        r.register(_EngineCollector(self))
        r.register(_TenantCollector(self))

    def render(self, snapshot: EngineSnapshot) -> bytes:
        self.snapshot = snapshot
        return generate_latest(self.registry)


def _histogram(name: str, doc: str, label: str, hists: dict[str, Any]) -> HistogramMetricFamily:
    """hists: label value -> adapters.metrics.Histogram (buckets, counts, n, total)."""
    fam = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in hists.items():
        cumulative, buckets = 0, []
        for bound, count in zip(h.buckets, h.counts):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", h.n))
        fam.add_metric([value], buckets, sum_value=h.total)
    return fam


def _counters(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    """values: label value -> count, already bounded (LabelGate.fold) where the values are adapter names."""
    fam = CounterMetricFamily(name, doc, labels=[label])
    for value, n in values.items():
        fam.add_metric([value], n)
    return fam


class _EngineCollector:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self.metrics.snapshot
        if s is None:
            return
        mem = self.metrics.memory
        fam = GaugeMetricFamily("loraplex_memory_bytes", "Memory by component, fixed at start", labels=["component"])
        for component, value in (("weights", mem.weights), ("kv_cache", mem.kv_cache), ("adapter_slots", mem.adapters)):
            fam.add_metric([component], value)
        yield fam
        info = GaugeMetricFamily("loraplex_base_model_info", "The base model's quantization, dtype and device (value 1)",
                                 labels=["quantization", "dtype", "device"])
        info.add_metric([mem.quantization, self.metrics.dtype, self.metrics.device], 1)
        yield info
        yield GaugeMetricFamily("loraplex_kv_cache_capacity_tokens", "Tokens the KV cache holds", value=mem.kv_tokens)
        yield GaugeMetricFamily("loraplex_kv_cache_capacity_sequences",
                                "Concurrent sequences of max_model_len tokens the KV cache holds", value=mem.kv_sequences_at_max_len)
        yield GaugeMetricFamily("loraplex_max_model_len", "Context length the capacity is counted at", value=mem.max_model_len)
        yield GaugeMetricFamily("loraplex_adapter_slots", "Device slots for adapters (distinct adapters per step)",
                                value=mem.adapter_slots)
        yield GaugeMetricFamily("loraplex_queue_depth", "Requests waiting to be scheduled", value=s.waiting)
        yield GaugeMetricFamily("loraplex_running_requests", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("loraplex_batch_tokens", "Tokens in the last engine step", value=s.last_step_tokens)
        kv = GaugeMetricFamily("loraplex_kv_cache_blocks", "KV-cache blocks by state", labels=["state"])
        kv.add_metric(["free"], s.kv_blocks_free)
        kv.add_metric(["used"], s.kv_blocks_total - s.kv_blocks_free)
        yield kv
        pc = s.prefix_cache
        gate = self.metrics.label
        yield _counters("loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, by model",
                        "model", gate.fold(pc.queries))
        yield _counters("loraplex_prefix_cache_hits", "Prompt tokens found in the prefix cache, by model", "model",
                        gate.fold(pc.hits))
        yield _counters("loraplex_nonfinite_requests", "Requests ended because their activations became NaN or "
                        "infinite (HTTP 422; each alone, no other request affected), by model", "model",
                        gate.fold(s.nonfinite_requests))
        yield GaugeMetricFamily("loraplex_prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens) since start",
                                value=pc.hit_rate)
        yield GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks findable in the prefix cache",
                                value=pc.cached_blocks)
        yield CounterMetricFamily("loraplex_prefix_cache_evictions", "Cached KV blocks reclaimed for new content",
                                  value=pc.evictions)
        a = s.adapters
        for name, doc, values in (
            ("loraplex_adapter_loads", "Adapter loads into a tier (host: from disk; device: into a slot)", a.loads),
            ("loraplex_adapter_cache_hits", "Adapter found already in the tier", a.hits),
            ("loraplex_adapter_cache_misses", "Adapter not in the tier when needed", a.misses),
            ("loraplex_adapter_evictions", "Adapters evicted from the tier", a.evictions),
        ):
            yield _counters(name, doc, "tier", values)
        yield CounterMetricFamily("loraplex_adapter_load_failures", "Adapter loads that failed", value=a.load_failures)
        resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapters held in the tier", labels=["tier"])
        for tier, v in a.resident.items():
            resident.add_metric([tier], v)
        yield resident
        yield GaugeMetricFamily("loraplex_adapter_loads_in_flight", "Disk loads running", value=a.loading)
        yield GaugeMetricFamily("loraplex_adapter_slot_references",
                                "Requests holding a device slot (sum of the slots' reference counts)", value=a.slot_refs)
        yield _histogram("loraplex_adapter_load_seconds", "Adapter load latency by tier", "tier", a.load_latency)
        per = GaugeMetricFamily("loraplex_adapter_requests", "Requests per adapter by state", labels=["adapter", "state"])
        for state, counts in (("queued", a.queued), ("running", a.running)):
            for adapter, n in gate.fold(counts).items():
                per.add_metric([adapter, state], n)
        yield per


class _TenantCollector:
    """The fair share's tenants (server/stats/shares.py), a series per tenant through `tenant_label`: tenants beyond
    its limit are summed under "other" (their weights are not shown)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        gate = self.metrics.tenant_label
        requests = GaugeMetricFamily("loraplex_tenant_requests", "Requests in flight per tenant (a key's id, or an "
                                     "adapter without keys): queued (no token yet) or running",
                                     labels=["tenant", "state"])
        prompt = CounterMetricFamily("loraplex_tenant_prompt_tokens", "Prompt tokens served per tenant",
                                     labels=["tenant"])
        output = CounterMetricFamily("loraplex_tenant_generation_tokens", "Output tokens served per tenant",
                                     labels=["tenant"])
        share = GaugeMetricFamily("loraplex_tenant_share", "Each tenant's share of the output tokens of the last "
                                  "minute", labels=["tenant"])
        weight = GaugeMetricFamily("loraplex_tenant_weight", "Each tenant's weight in the fair share",
                                   labels=["tenant"])
        throttled = CounterMetricFamily("loraplex_tenant_throttled", "Requests refused with a 429 at a tenant's cap, "
                                        "by tenant and the limit hit (in_flight, requests, tokens)",
                                        labels=["tenant", "limit"])
        sums: dict[str, list[float]] = {}  # label -> queued, running, prompt, output, share
        hits: dict[tuple[str, str], int] = {((OTHER, k)): n for k, n in self.metrics.shares.unattributed.items()}
        for t, row in self.metrics.shares.rows().items():
            label = gate(t)
            acc = sums.setdefault(label, [0.0] * 5)
            for i, v in enumerate((row.queued, row.running, row.prompt_tokens, row.output_tokens, row.share or 0.0)):
                acc[i] += v
            if label != OTHER:
                weight.add_metric([label], row.weight)
            for limit, n in row.throttled.items():
                hits[(label, limit)] = hits.get((label, limit), 0) + n
        for label, (queued, running, p, o, sh) in sums.items():
            requests.add_metric([label, "queued"], queued)
            requests.add_metric([label, "running"], running)
            prompt.add_metric([label], p)
            output.add_metric([label], o)
            share.add_metric([label], sh)
        for (label, limit), n in hits.items():
            throttled.add_metric([label, limit], n)
        yield from (requests, prompt, output, share, weight, throttled)
