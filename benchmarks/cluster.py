"""The cluster on one machine: 2 engine replicas on Ray Serve, Zipf popularity over 64 adapters, routing by
adapter (Ray Serve's model multiplexing, loraplex's default) against Ray Serve's default routing without it
(power of two choices by queue length): cold adapter loads per 1,000 requests and TTFT, with the replicas'
claim admission (cluster/admission.py; --claim-policy lru for Ray's plain LRU of claims); then the throughput
of 2 replicas against 1 on the same cores, a hot adapter's spread, how long a promotion takes to reach every
replica, and what the measured hit rates predict for 1,000 adapters on 8 replicas (benchmarks/cluster_sim.py).

    .venv/bin/python -m benchmarks.cluster --adapters results/adapters [--requests 6000 --warmup 500 --rate 5]

6,000 counted requests per routing (about 45 minutes for both): the TTFT gain affinity can give here is a few ms
(the cold loads it saves times their 20-70 ms), and the p99 gap of a run moved by +-30 ms at 95% with 1,000
requests, +-13 ms with 2,000, +-10 ms with 6,000 (the bootstrap interval the run records).

Each replica's host tier holds 24 adapters (--max-cpu-loras 24, also its multiplexed claims): together the two
hold 48 of the 64, one alone does not. The first --warmup requests fill the tiers and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.cluster_sim import expected_on, simulate, zipf_weights
from benchmarks.common import machine, make_adapters, percentile, write_json
from loraplex.cluster import app as cluster_app
from loraplex.cluster.config import CLAIM_POLICIES, ClusterConfig
from loraplex.config import EngineConfig, ServerConfig

ADAPTERS, CAPACITY, ZIPF_S = 64, 24, 1.0


def counters(url: str, family: str) -> list[tuple[dict[str, str], int]]:
    """(labels, value) of each sample of one counter family on the ingress's /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return [(s.labels, int(s.value)) for f in text_string_to_metric_families(text) if f.name == family
            for s in f.samples if s.name == family + "_total"]


def replica_loads(url: str) -> int:
    """Cold loads (disk -> host) summed over the replicas."""
    return sum(n for labels, n in counters(url, "loraplex_replica_adapter_loads") if labels["tier"] == "host")


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, prompt: str) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0, first, tokens, error = time.perf_counter(), None, 0, False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                error = True
            elif data["choices"] and data["choices"][0]["text"]:
                first = first or time.perf_counter()
                tokens += 1
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": tokens, "error": error or r.status_code != 200,
            "seconds": time.perf_counter() - t0}


async def poisson(url: str, models: list[str], rate: float, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300) as client:
        tasks = []
        for i, m in enumerate(models):
            tasks.append(asyncio.create_task(one(client, url, m, max_tokens, f"Request {i}: tell me a story.")))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


async def burst(url: str, models: list[str], max_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(one(client, url, m, max_tokens, f"Burst {i}: count slowly.")
                                    for i, m in enumerate(models)))
        return sum(r["tokens"] for r in rs) / (time.perf_counter() - t0), list(rs)


def routing_results(url: str) -> dict[str, int]:
    """The ingress's routing counters: hit / miss (the replica held the adapter or not) and spill."""
    return {labels["result"]: n for labels, n in counters(url, "loraplex_cluster_routing")}


def served(url: str, model: str) -> dict[str, int]:
    """Requests for `model` each replica took."""
    return {labels["replica"]: n for labels, n in counters(url, "loraplex_replica_requests")
            if labels["model"] == model}


def promotions(url: str, root: Path, n: int) -> list[float]:
    """Seconds per promotion, each returning once every replica has read it from the shared registry."""
    post = lambda path, body: httpx.post(url + path, json=body, timeout=60).raise_for_status()  # noqa: E731
    post("/v1/load_lora_adapter", {"lora_name": "promo", "lora_path": str(root / "a1")})
    post("/v1/load_lora_adapter", {"lora_name": "promo", "lora_path": str(root / "a2"), "promote": False})
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        post("/v1/promote_lora_adapter", {"lora_name": "promo", "version": "2" if i % 2 == 0 else "1"})
        out.append(time.perf_counter() - t0)
    return out


def run_cluster(root: Path, replicas: int, cpus: float, affinity: bool, work: Any, args: argparse.Namespace) -> Any:
    with tempfile.TemporaryDirectory() as reg:
        engine = EngineConfig(adapter_dir=str(root), registry_file=str(Path(reg) / "registry.json"), max_loras=8,
                              max_cpu_loras=CAPACITY, kv_cache_memory=256 << 20, enable_prefix_caching=False)
        cluster = ClusterConfig(replicas=replicas, cpus_per_replica=cpus, max_adapters_per_replica=CAPACITY,
                                affinity=affinity, spill_margin=args.spill_margin, claim_policy=args.claim_policy,
                                popularity_half_life_s=args.half_life, replicate_share=args.replicate_share,
                                app_name="loraplex-bench")
        url = cluster_app.start(engine, ServerConfig(port=8731), cluster)
        try:
            while len(httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["replicas"]) < replicas:
                time.sleep(0.2)
            return work(url)
        finally:
            cluster_app.stop(cluster)


def p99_gap_interval(a: list[float], b: list[float], trials: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of p99(b) - p99(a): how far one run's TTFT p99 difference is from noise (the p99
    of n samples is their n/100th largest)."""
    rng = random.Random(seed)
    gaps = sorted(percentile(rng.choices(b, k=len(b)), 99) - percentile(rng.choices(a, k=len(a)), 99)
                  for _ in range(trials))
    return gaps[int(0.025 * trials)], gaps[int(0.975 * trials)]


def zipf_run(url: str, args: argparse.Namespace, policy: str) -> dict[str, Any]:
    rng = random.Random(1)
    indices = rng.choices(range(ADAPTERS), weights=zipf_weights(ADAPTERS, ZIPF_S), k=args.warmup + args.requests)
    stream = [f"a{i}" for i in indices]
    asyncio.run(poisson(url, stream[: args.warmup], args.rate, args.max_tokens, seed=2))
    loads0, routing0 = replica_loads(url), routing_results(url)
    t0 = time.perf_counter()
    rs = asyncio.run(poisson(url, stream[args.warmup:], args.rate, args.max_tokens, seed=3))
    seconds = time.perf_counter() - t0
    time.sleep(0.6)  # the replicas' next reports
    loads = replica_loads(url) - loads0
    routing = {k: n - routing0.get(k, 0) for k, n in routing_results(url).items()}
    ttft = [1e3 * r["ttft"] for r in rs]
    share = None if policy == "queue" else args.replicate_share
    return {"requests": len(rs), "errors": sum(r["error"] for r in rs), "cold_loads": loads,
            "cold_loads_per_1000": 1000 * loads / len(rs), "distinct_adapters": len(set(stream[args.warmup:])),
            # the policy's ideal placement (cluster_sim.py) on exactly this stream: the yardstick for this sample
            "ideal_cold_loads_per_1000": expected_on(policy, indices, ADAPTERS, 2, CAPACITY, args.warmup,
                                                     half_life=args.half_life * args.rate, replicate_share=share),
            "ttft_ms": {"p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p95": percentile(ttft, 95),
                        "p99": percentile(ttft, 99), "mean": sum(ttft) / len(ttft)},
            "tokens_per_s": sum(r["tokens"] for r in rs) / seconds, "routing": routing, "ttft_samples_ms": ttft}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=Path, default=Path("results/adapters"))
    ap.add_argument("--requests", type=int, default=6000, help="counted requests per routing")
    ap.add_argument("--warmup", type=int, default=500, help="requests that fill the tiers first, not counted")
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second (Poisson)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--spill-margin", type=int, default=ClusterConfig().spill_margin)
    ap.add_argument("--claim-policy", choices=CLAIM_POLICIES, default=ClusterConfig().claim_policy)
    ap.add_argument("--half-life", type=float, default=ClusterConfig().popularity_half_life_s,
                    help="seconds in which an adapter's request count halves (claim admission)")
    ap.add_argument("--replicate-share", type=float, default=ClusterConfig().replicate_share,
                    help="share of the recent requests that earns an adapter one more holder (above 1: never)")
    ap.add_argument("--burst", type=int, default=48, help="concurrent requests in the throughput runs")
    args = ap.parse_args()
    from benchmarks.common import default_model_dir

    root = args.adapters.resolve()
    make_adapters(default_model_dir(), root, ADAPTERS)
    import ray

    result: dict[str, Any] = {"machine": machine(), "ray": ray.__version__, "adapters": ADAPTERS, "zipf_s": ZIPF_S,
                              "host_capacity_per_replica": CAPACITY, "rate": args.rate, "max_tokens": args.max_tokens,
                              "spill_margin": args.spill_margin, "claim_policy": args.claim_policy,
                              "popularity_half_life_s": args.half_life, "replicate_share": args.replicate_share,
                              "warmup": args.warmup}
    mixed = [f"a{i % 8}" for i in range(args.burst)]

    def affinity_work(url: str) -> dict[str, Any]:
        out = zipf_run(url, args, "frequency" if args.claim_policy == "frequency" else "affinity")
        out["burst_tokens_per_s"] = asyncio.run(burst(url, mixed, 32))[0]
        before = served(url, "a9")
        asyncio.run(burst(url, ["a9"] * 40, 16))  # one adapter, 40 requests at once: the hot-adapter rule
        time.sleep(0.6)
        out["hot_adapter_requests_per_replica"] = sorted((n - before.get(r, 0) for r, n in served(url, "a9").items()),
                                                         reverse=True)
        prom = promotions(url, root, 10)
        out["promotion_ms"] = {"p50": 1e3 * percentile(prom, 50), "max": 1e3 * max(prom)}
        return out

    result["affinity"] = run_cluster(root, 2, 1.0, True, affinity_work, args)
    result["queue"] = run_cluster(root, 2, 1.0, False, lambda url: zipf_run(url, args, "queue"), args)
    result["one_replica_burst_tokens_per_s"] = run_cluster(
        root, 1, 2.0, True, lambda url: asyncio.run(burst(url, mixed, 32))[0], args)
    a, q = result["affinity"], result["queue"]
    result["cold_load_ratio"] = q["cold_loads_per_1000"] / max(a["cold_loads_per_1000"], 1e-9)
    result["ttft_p99_ratio"] = q["ttft_ms"]["p99"] / a["ttft_ms"]["p99"]
    result["ttft_p99_gap_ms_95ci"] = p99_gap_interval(a.pop("ttft_samples_ms"), q.pop("ttft_samples_ms"))
    result["two_vs_one_replica"] = a["burst_tokens_per_s"] / result["one_replica_burst_tokens_per_s"]
    # What the measured regime predicts at scale: the same placement rules, simulated.
    # The 1,000-adapter rows at 100 requests/s: the half-life counts requests, and 8 replicas serve more than 2.
    configs = [(ADAPTERS, 2, CAPACITY, args.rate, 20_000, 5_000), (1000, 8, 128, 100.0, 40_000, 20_000),
               (1000, 8, 64, 100.0, 40_000, 20_000)]
    result["simulated"] = []
    for adapters, replicas, cap, rate, n, warm in configs:
        for p in ("frequency", "affinity", "queue"):
            s = simulate(p, adapters, replicas, cap, n, ZIPF_S, warmup=warm, half_life=args.half_life * rate,
                         replicate_share=None if p == "queue" else args.replicate_share)
            result["simulated"].append({
                "policy": s.policy, "adapters": s.adapters, "replicas": s.replicas, "capacity": s.capacity,
                "rate": rate, "loads_per_1000": s.loads_per_1000, "hit_rate": s.hit_rate,
                "loads_per_replica_per_1000": [1000 * x / s.requests for x in s.loads_per_replica]})
    path = write_json("cluster", result)
    print(f"Zipf over {ADAPTERS} adapters, 2 replicas x {CAPACITY} in host memory, {args.requests} requests at "
          f"{args.rate}/s: cold loads per 1,000: affinity {a['cold_loads_per_1000']:.0f}, queue-length routing "
          f"{q['cold_loads_per_1000']:.0f} ({result['cold_load_ratio']:.2f}x fewer); TTFT p99 "
          f"{a['ttft_ms']['p99']:.0f} vs {q['ttft_ms']['p99']:.0f} ms (queue minus affinity, 95% bootstrap interval: "
          f"{result['ttft_p99_gap_ms_95ci'][0]:+.0f} to {result['ttft_p99_gap_ms_95ci'][1]:+.0f} ms); "
          f"errors {a['errors']} / {q['errors']}; the ideal placement on this stream: "
          f"{a['ideal_cold_loads_per_1000']:.0f} vs {q['ideal_cold_loads_per_1000']:.0f}")
    print(f"throughput, {args.burst} streams over 8 adapters: 2 replicas {a['burst_tokens_per_s']:.0f} tok/s, "
          f"1 replica {result['one_replica_burst_tokens_per_s']:.0f} tok/s ({result['two_vs_one_replica']:.2f}x)")
    print(f"hot adapter, 40 requests at once: per replica {a['hot_adapter_requests_per_replica']}; promotion visible "
          f"on every replica: p50 {a['promotion_ms']['p50']:.0f} ms, max {a['promotion_ms']['max']:.0f} ms")
    for s in result["simulated"]:
        print(f"simulated {s['adapters']} adapters on {s['replicas']} replicas x {s['capacity']}: {s['policy']}: "
              f"{s['loads_per_1000']:.0f} loads per 1,000, hit rate {s['hit_rate']:.2f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
