"""Soak with chaos against a real `loraplex serve`: N concurrent clients over M adapters (Zipf), streaming and not,
chat and completions, for a bounded time; after a calm phase, a chaos phase adds admin actions on adapters in use
(benchmarks/soak_chaos.py), hang-ups mid-stream, 10% bad requests of every kind (poisoned adapters among them)
and bursts above --max-queue.
Then it checks, and prints as a table: every completed greedy answer equals the solo reference of the adapter
version that served it (system_fingerprint), every request is accounted for (no 5xx, no hang), nothing leaked
after draining (KV blocks, slot references, queue), RSS growth after warm-up, and TTFT/TPOT p99 with and without
chaos. Exit status 1 if any check fails.

    python -m benchmarks.soak                      # 10 minutes, 32 clients, 64 adapters (make soak)
    python -m benchmarks.soak --duration 60 --clients 16 --adapters 16   # the test suite's version

The server runs in float32: there, batched greedy decoding is exactly the solo one (tests/test_mixed_batch.py), so
"equal to solo" is a check of isolation, not of rounding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import default_model_dir, machine, write_json
from benchmarks.serving import free_port, stop_server, wait_healthy
from benchmarks.soak_chaos import AdminLog, Chaos
from benchmarks.soak_traffic import CHAT_PROMPTS, COMPLETION_PROMPTS, MAX_BODY, BadInputs, Keys, Traffic
from benchmarks.soak_verify import accounting, latency, table, verify

BASE = "base"  # --served-model-name
CHAOS = ("admin", "hangups", "bad", "bursts")
OVERFLOW = "poison-overflow"  # the loaded adapter whose finite weights overflow in the LoRA product
POISON_KINDS = ("huge-scale-adapter", "overflow-adapter")


class WeightsFactory:
    """Fresh, distinct adapter versions: one PEFT-made template (rank 4 on q/v), new seeded random tensors each
    time (milliseconds, so the chaos loop can make hundreds)."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        from transformers import AutoModelForCausalLM

        from loraplex.training.synthetic import random_adapter

        self.root = root
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.template = random_adapter(base, root / "template", r=4, alpha=8, targets=("q_proj", "v_proj"))
        self.tensors = load_file(self.template / "adapter_model.safetensors")
        self.count = 0

    def __call__(self) -> Path:
        self.count += 1
        out = self.root / f"w{self.count}"
        out.mkdir()
        g = torch.Generator().manual_seed(self.count)
        # A ~ N(0, 1/in), B ~ N(0, 0.6^2/r): strong enough that most versions answer differently.
        save_file({k: torch.randn(t.shape, generator=g) * ((1.0 if "lora_A" in k else 0.6) / t.shape[1] ** 0.5)
                   for k, t in self.tensors.items()}, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text((self.template / "adapter_config.json").read_text())
        return out


def corrupt_adapter(root: Path, template: Path) -> Path:
    out = root / "corrupt"
    out.mkdir()
    (out / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
    (out / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    return out


def huge_scale_adapter(root: Path, template: Path) -> Path:
    """Finite weights and lora_alpha 1e300: alpha / r is finite in float64 but no fp32/bf16 weight holds it."""
    out = root / "huge-scale"
    out.mkdir()
    config = json.loads((template / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e300}))
    (out / "adapter_model.safetensors").write_bytes((template / "adapter_model.safetensors").read_bytes())
    return out


def overflow_adapter(root: Path, template: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Every weight 1e30 (finite in fp32): x @ A^T is ~1e31, times B^T ~1e61, which overflows to inf."""
    out = root / "overflow"
    out.mkdir()
    (out / "adapter_config.json").write_text((template / "adapter_config.json").read_text())
    save_file({k: torch.full_like(t, 1e30) for k, t in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


async def load_overflow(client: httpx.AsyncClient, url: str, key: str, path: Path) -> tuple[int, tuple[int, ...]]:
    """Load the overflowing adapter; returns the load's status and what its requests must get: a per-request 4xx
    once loaded, or a 404 if the server refused it at load (a bound on the product: no slot ever holds it either)."""
    r = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": OVERFLOW, "lora_path": str(path)},
                          headers={"Authorization": f"Bearer {key}"})
    if r.status_code == 200:
        return 200, (400, 422)
    if r.status_code == 400:
        print(f"the overflowing adapter was refused at load: {r.text[:200]}", file=sys.stderr)
        return 400, (404,)
    raise RuntimeError(f"loading the overflowing adapter {path}: {r.status_code} {r.text[:300]}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metrics(url: str, key: str) -> dict[str, float]:
    """The unlabelled and state-labelled samples the leak checks read, from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def drain(url: str, key: str, timeout: float = 120) -> dict[str, float]:
    """Wait until no request is queued or running and no load is in flight; then drop the prefix cache's blocks,
    so that every KV block must be free."""
    deadline = time.monotonic() + timeout
    while True:
        m = await asyncio.to_thread(metrics, url, key)
        idle = m["loraplex_queue_depth"] == 0 and m["loraplex_running_requests"] == 0 \
            and m["loraplex_adapter_loads_in_flight"] == 0
        if idle or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    httpx.post(url + "/reset_prefix_cache", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return await asyncio.to_thread(metrics, url, key)


async def soak(args: argparse.Namespace, url: str, pid: int, keys: Keys, weights: WeightsFactory,
               bad: BadInputs, overflow: Path) -> dict[str, Any]:
    adapters = [f"a{i}" for i in range(args.adapters)]
    zipf = [1.0 / rank ** args.zipf for rank in range(1, len(adapters) + 1)]
    log = AdminLog()
    chaos = Chaos(url, keys.admin, adapters, zipf, weights, log, args.seed)
    # A connection per request: a kept-alive connection that the server closes as idle (uvicorn, after 5 s) just as
    # a client reuses it fails in the client, which would count as a lost request that the server never saw.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=120) as client:
        for name in adapters:  # every adapter starts at version 1, from its own weights
            if await chaos.load(client, name, action="initial-load") is None:
                raise RuntimeError(f"could not load {name}: {log.failures[-1]}")
        overflow_load, bad.overflow_expected = await load_overflow(client, url, keys.admin, overflow)
        prompts: dict[tuple[str, int], list[int]] = {}
        for i, text in enumerate(CHAT_PROMPTS):
            r = await client.post(url + "/tokenize", json={"messages": [{"role": "user", "content": text}]},
                                  headers={"Authorization": f"Bearer {keys.admin}"})
            prompts[("chat", i)] = r.json()["tokens"]
        for i, text in enumerate(COMPLETION_PROMPTS):
            r = await client.post(url + "/tokenize", json={"prompt": text}, headers={"Authorization": f"Bearer {keys.admin}"})
            prompts[("completions", i)] = r.json()["tokens"]
        traffic = Traffic(url, BASE, adapters, zipf, keys, bad, args.seed)
        # Warm-up: every adapter once, the burst path once, then the allocator settles: RSS is measured from here.
        warm = Traffic(url, BASE, adapters, [1.0] * len(adapters), keys, bad, args.seed + 1)
        await asyncio.gather(*(warm.client(client, i, time.perf_counter() + args.warmup) for i in range(args.clients)))
        await warm.burst(client, args.burst)
        await drain(url, keys.admin)
        rss = {"after_warmup": rss_bytes(pid)}
        samples: list[tuple[float, int]] = []

        async def sample_rss(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                samples.append((time.perf_counter() - t0, rss_bytes(pid)))
                await asyncio.sleep(5)

        t0 = time.perf_counter()
        calm_end = t0 + args.duration * args.calm_fraction
        end = t0 + args.duration
        print(f"calm phase: {calm_end - t0:.0f} s", file=sys.stderr)
        rss_task = asyncio.create_task(sample_rss(end))
        await asyncio.gather(*(traffic.client(client, i, calm_end) for i in range(args.clients)))
        print(f"chaos phase: {end - calm_end:.0f} s", file=sys.stderr)
        traffic.phase, traffic.chaos, traffic.kinds = "chaos", True, frozenset(args.chaos)

        async def bursts() -> None:
            while time.perf_counter() + args.burst_every < end:
                await asyncio.sleep(args.burst_every)
                await traffic.burst(client, args.burst)

        faults = ([chaos.run(client, end, args.chaos_interval)] if "admin" in args.chaos else []) + (
            [bursts()] if "bursts" in args.chaos else []) + (
            [traffic.every_bad_kind(client)] if "bad" in args.chaos else [])
        await asyncio.gather(*faults, *(traffic.client(client, i, end) for i in range(args.clients)))
        await rss_task
        after = await drain(url, keys.admin)
        rss["after_drain"] = rss_bytes(pid)
        rss["peak_during_run"] = max(s for _, s in samples) if samples else rss["after_drain"]
    return {"traffic": traffic, "log": log, "after": after, "rss": rss, "prompts": prompts,
            "rss_samples": samples, "overflow_load": overflow_load}


def poison_outcomes(traffic: Any) -> dict[str, tuple[int, int, int]]:
    """Per poisoned kind (POISON_KINDS): (requests that got an expected 4xx, requests that reached the server's
    admission, requests shed with a 503 while a burst filled the server). A shed request never met its adapter, so
    it proves nothing either way; the check needs every admitted one to get its 4xx, and at least one admitted. The
    other requests' answers are checked against their solo references as always: a poisoned neighbour must not
    change them."""
    out = {}
    for kind in POISON_KINDS:
        sent = [r for r in traffic.records if r.kind == kind]
        shed = [r for r in sent if r.outcome == "503" and traffic.during_burst(r)]
        admitted = [r for r in sent if r not in shed]
        out[kind] = (sum(r.status in r.expected and r.outcome == "4xx" for r in admitted), len(admitted), len(shed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic after warm-up")
    ap.add_argument("--calm-fraction", type=float, default=0.2, help="share of the run without chaos (the baseline)")
    ap.add_argument("--warmup", type=float, default=20, help="seconds of warm-up traffic before RSS is taken")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--max-loras", type=int, default=8, help="device slots (fewer than adapters: slots churn)")
    ap.add_argument("--max-cpu-loras", type=int, default=32, help="host tier (fewer than adapters: LRU churns)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--burst", type=int, default=96, help="requests per burst (above max-num-seqs + max-queue)")
    ap.add_argument("--burst-every", type=float, default=30)
    ap.add_argument("--chaos-interval", type=float, default=2.0, help="mean seconds between admin actions")
    ap.add_argument("--chaos", nargs="+", default=list(CHAOS), choices=CHAOS,
                    help="the faults of the chaos phase (all by default; fewer to find which one costs what)")
    ap.add_argument("--rss-growth-limit", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None, help="adapters, keys, registry and server log (default: temp)")
    args = ap.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    weights = WeightsFactory(model_dir, work / "weights")
    bad = BadInputs(str(corrupt_adapter(work, weights.template)), str(huge_scale_adapter(work, weights.template)),
                    OVERFLOW)
    overflow = overflow_adapter(work, weights.template, weights.tensors)
    keys = Keys("sk-soak-admin", "sk-soak-tenant", "a0", "sk-soak-flood")
    (work / "keys.json").write_text(json.dumps({"keys": {keys.admin: {"adapters": ["*"], "admin": True},
                                                         keys.tenant: {"adapters": [keys.tenant_adapter]},
                                                         keys.flood: {"adapters": ["*"], "max_in_flight": 8}}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = work / "server.log"
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", str(model_dir), "--port", str(port), "--dtype", "float32",
           "--served-model-name", BASE, "--api-keys", str(work / "keys.json"), "--registry-file",
           str(work / "registry.json"), "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
           "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.max_queue), "--max-model-len", "1024",
           "--allowed-adapter-roots", str(work), "--max-body-size", str(MAX_BODY)]  # every adapter it loads at run time is written there
    import subprocess

    with open(server_log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, server_log)
        started = time.perf_counter()
        run = asyncio.run(soak(args, url, proc.pid, keys, weights, bad, overflow))
        wall = time.perf_counter() - started
    finally:
        exit_code = stop_server(proc)
    traffic, log, after, rss = run["traffic"], run["log"], run["after"], run["rss"]
    records = traffic.records
    print("verifying against solo references ...", file=sys.stderr)
    verdict = verify(traffic, log, model_dir, run["prompts"])
    acct = accounting(records)
    calm, chaotic = latency(records, "calm"), latency(records, "chaos")
    growth = (rss["after_drain"] - rss["after_warmup"]) / rss["after_warmup"]
    kv_free = after['loraplex_kv_cache_blocks{state="free"}']
    kv_used = after['loraplex_kv_cache_blocks{state="used"}']
    internal = sum(1 for line in server_log.read_text().splitlines() if "internal error" in line or "Traceback" in line)
    o = acct["outcomes"]
    poison = poison_outcomes(traffic)
    rows = [
        ("requests accounted for", f"sent {acct['sent']} = completed {o.get('completed', 0)} + client-aborted "
         f"{o.get('client-aborted', 0)} + 4xx {o.get('4xx', 0)} + 429 {o.get('429', 0)} + 503 {o.get('503', 0)} + "
         f"other {acct['sent'] - sum(o.get(k, 0) for k in ('completed', 'client-aborted', '4xx', '429', '503'))}",
         acct["sent"] == sum(o.get(k, 0) for k in ("completed", "client-aborted", "4xx", "429", "503"))),
        ("zero 5xx", f"{acct['5xx']} (in-band stream errors included); server log tracebacks {internal}",
         acct["5xx"] == 0 and internal == 0),
        ("zero hangs", f"{acct['hangs']} requests unanswered after 120 s", acct["hangs"] == 0),
        ("every status expected for its kind", f"{len(verdict.unexpected)} unexpected", not verdict.unexpected),
        ("greedy answers equal their version's solo reference",
         f"{len(verdict.wrong)} wrong of {o.get('completed', 0)} completed; {verdict.references} references; "
         f"{verdict.distinguishing:.0%} of adapter references differ from the base model's", not verdict.wrong),
        ("poisoned adapters contained",
         f"overflowing adapter load {run['overflow_load']}; " + "; ".join(
             f"{k} {n_ok}/{n} as expected ({shed} shed by bursts)" for k, (n_ok, n, shed) in poison.items()),
         all(n_ok == n > 0 for n_ok, n, _ in poison.values())),
        ("a flooding key's bursts get its own 429s (no other key one)",
         f"{acct['burst_429']} of {acct['bursts_sent']} burst requests",
         acct["burst_429"] > 0 or args.calm_fraction >= 1 or "bursts" not in args.chaos),
        ("admin actions as expected", f"{sum(log.actions.values())} done ({', '.join(f'{k} {v}' for k, v in sorted(log.actions.items()))}); "
         f"{len(log.failures)} failed", not log.failures),
        ("KV blocks free after draining", f"{kv_free:.0f} free, {kv_used:.0f} used", kv_used == 0),
        ("slot references after draining", f"{after['loraplex_adapter_slot_references']:.0f}",
         after["loraplex_adapter_slot_references"] == 0),
        ("queue empty after draining", f"queued {after['loraplex_queue_depth']:.0f}, running "
         f"{after['loraplex_running_requests']:.0f}",
         after["loraplex_queue_depth"] == 0 and after["loraplex_running_requests"] == 0),
        (f"RSS growth after warm-up <= {args.rss_growth_limit:.0%}", f"{growth:+.1%} ({rss['after_warmup'] / 2**20:.0f} -> "
         f"{rss['after_drain'] / 2**20:.0f} MiB; peak {rss['peak_during_run'] / 2**20:.0f} MiB)",
         growth <= args.rss_growth_limit),
        ("server exits 0 on SIGTERM", str(exit_code), exit_code == 0),
    ]
    print(table(rows))
    for phase, lat in (("calm", calm), ("chaos", chaotic)):
        if lat.get("streams"):
            print(f"{phase:>5}: {lat['streams']} streams, TTFT p50 {lat['ttft_p50_ms']:.0f} ms p99 {lat['ttft_p99_ms']:.0f} ms, "
                  f"TPOT p50 {lat['tpot_p50_ms']:.1f} ms p99 {lat['tpot_p99_ms']:.1f} ms")
    for line in (verdict.wrong + verdict.unexpected + log.failures)[:20]:
        print("  " + line)
    passed = all(p for _, _, p in rows)
    write_json("soak", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall,
                        "passed": passed, "checks": [{"check": c, "figure": f, "passed": p} for c, f, p in rows],
                        "accounting": acct, "admin_actions": log.actions, "latency": {"calm": calm, "chaos": chaotic},
                        "rss": rss, "rss_samples": run["rss_samples"], "wrong": verdict.wrong[:50],
                        "unexpected": verdict.unexpected[:50], "admin_failures": log.failures[:50],
                        "references": verdict.references, "distinguishing": verdict.distinguishing,
                        "poison": {"overflow_load_status": run["overflow_load"],
                                   "overflow_expected": list(bad.overflow_expected),
                                   "outcomes": {k: {"expected": a, "admitted": n, "shed": shed}
                                                for k, (a, n, shed) in poison.items()}}})
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
