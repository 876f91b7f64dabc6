"""The report's section for benchmarks/cluster.py: affinity routing against queue-length routing, 2 replicas
against 1, and what the simulated placement predicts for a larger cluster."""

from __future__ import annotations

from typing import Any


POLICY = {"frequency": "affinity, claim admission", "affinity": "affinity, LRU claims", "queue": "queue length"}


def cluster_lines(c: dict[str, Any]) -> list[str]:
    a, q = c["affinity"], c["queue"]
    admission = c.get("claim_policy") == "frequency"
    share = c.get("replicate_share")
    replicate = (f"; an adapter with {share:.0%} or more of the recent requests gets one more holder per {share:.0%}, "
                 "by queue length while fewer replicas hold it" if share and share <= 1 else "")
    claims = (f"a replica claims a new adapter only if it is more popular than the claim Ray would evict for it, "
              f"else serves it on a transient copy (request counts halving every {c['popularity_half_life_s']:.0f} s)"
              if admission else "every request claims its adapter (Ray's LRU of claims)")
    lines = ["", "### Scale-out on Ray Serve: 2 engine replicas, Zipf over 64 adapters", "",
             f"Ray {c['ray']}; 2 replicas of one engine each (1 CPU each in Ray's accounting, 1 torch thread) on this "
             f"machine's cores, each holding {c['host_capacity_per_replica']} adapters in host memory (its multiplexed "
             f"claims too); Zipf (s = {c['zipf_s']}) over {c['adapters']} adapters, Poisson arrivals at {c['rate']} "
             f"req/s, {a['requests']} streaming completions of {c['max_tokens']} tokens after {c['warmup']} not "
             "counted. *Affinity*: loraplex's routing, the adapter as the multiplexed model id (spilling by queue length "
             f"when the adapter has {c.get('spill_margin', 2)} requests of its own in flight and its holders run "
             f"{c.get('spill_margin', 2)} more than the idlest replica){replicate}; {claims}. *Queue length*: Ray "
             "Serve's default power of two choices, no model id, every request claiming (plain LRU). *Ideal*: the "
             "policy's placement simulated on exactly the measured stream (cluster_sim.py: each replica an LRU of its "
             "claims"
             f"{', with the admission rule' if admission else ''}"
             f"{', replicating as above (which replica has room: uniform)' if replicate else ''}, no spill), "
             "the yardstick for a sample this size.", "",
             "| routing | cold loads / 1,000 requests | ideal on this stream | TTFT p50 (ms) | TTFT p95 (ms) | "
             "TTFT p99 (ms) | tok/s | spills | replications | transient | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("affinity (multiplexing)", a), ("queue length (no multiplexing)", q)):
        ideal, routing = r.get("ideal_cold_loads_per_1000"), r.get("routing", {})
        p95 = f"{r['ttft_ms']['p95']:.0f}" if "p95" in r["ttft_ms"] else ""
        lines.append(f"| {name} | {r['cold_loads_per_1000']:.0f} | {'' if ideal is None else f'{ideal:.0f}'} "
                     f"| {r['ttft_ms']['p50']:.0f} | {p95} | {r['ttft_ms']['p99']:.0f} | {r['tokens_per_s']:.0f} "
                     f"| {routing.get('spill', '')} | {routing.get('replicate', 0)} | {routing.get('transient', 0)} "
                     f"| {r['errors']} |")
    gap = c.get("ttft_p99_gap_ms_95ci")
    noise = (f"; the p99 difference (queue-length minus affinity) has a 95% bootstrap interval of {gap[0]:+.0f} to "
             f"{gap[1]:+.0f} ms (the p99 of {a['requests']:,} samples is their {a['requests'] // 100}th largest)"
             if gap else "")
    lines += ["", f"Cold loads, queue-length routing / affinity: {c['cold_load_ratio']:.2f}; TTFT p99, queue-length "
              f"routing / affinity: {c['ttft_p99_ratio']:.2f} (above 1: affinity's p99 is lower){noise}. Throughput of 48 streams "
              f"over 8 adapters: 2 replicas (1 torch thread each) {a['burst_tokens_per_s']:.0f} tok/s against 1 replica "
              f"(2 threads) {c['one_replica_burst_tokens_per_s']:.0f} tok/s ({c['two_vs_one_replica']:.2f}x), on the same 2 "
              "cores: this compares two ways of using one machine, not added hardware. "
              f"A hot adapter (40 requests at once, spill threshold 16 per replica) was served "
              f"{' + '.join(str(n) for n in a['hot_adapter_requests_per_replica'])} by the replicas. A promotion "
              f"returned, read by every replica from the shared registry, in {a['promotion_ms']['p50']:.0f} ms (p50; "
              f"max {a['promotion_ms']['max']:.0f} ms).", "",
              "On a real multi-node cluster each replica has its own cores (or GPU), so throughput adds up per "
              "replica and what routing decides is the cold loads. The placement rules, simulated (benchmarks/"
              "cluster_sim.py, steady state: multiplexed routing without the spill rule, each replica an LRU of its "
              "claims, with claim admission or without; the 2-replica rows are the measured configuration, for "
              "comparison with the table above; request counts halve every "
              f"{c.get('popularity_half_life_s', 120):.0f} s, and the half-life spans more requests at a higher rate):",
              "", "| adapters | replicas x held | req/s | routing | loads / 1,000 | hit rate | loads / 1,000 per replica |",
              "|---|---|---|---|---|---|---|"]
    for s in c["simulated"]:
        per = ", ".join(f"{x:.0f}" for x in s["loads_per_replica_per_1000"])
        lines.append(f"| {s['adapters']} | {s['replicas']} x {s['capacity']} | {s.get('rate', c['rate']):.0f} | "
                     f"{POLICY[s['policy']]} | "
                     f"{s['loads_per_1000']:.0f} | "
                     f"{s['hit_rate']:.2f} | {per} |")
    return lines


def cluster_targets(c: dict[str, Any] | None) -> list[tuple[str, float | None, str, float, bool]]:
    return [("cluster: cold loads per 1,000, queue-length routing / affinity", c["cold_load_ratio"] if c else None,
             "≥ 3×", 3.0, True),
            ("cluster: TTFT p99, queue-length routing / affinity", c["ttft_p99_ratio"] if c else None, "> 1", 1.0, True)]
