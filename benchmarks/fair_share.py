"""Fair share between tenants over HTTP (issue 29): a quiet tenant beside a flood, throughput against first come
first served, and the shares of four flooding tenants by weight.

    .venv/bin/python -m benchmarks.fair_share [--flood 160] [--quiet-requests 20] [--alone-requests 40]
        [--measure-s 30] [--warm-s 10]
        [--server-args ...]

Starts `loraplex serve` (default flags: a batch of 64, a queue of 256) with a keys file of six tenant keys, then:

1. **alone**: the quiet key sends one 16-token request every 1.5 s (a 32-token prompt, its own adapter),
   `--alone-requests` of them (the baseline of both ratios: its p99 is the largest of fewer than 100);
2. **fair**: another key keeps `--flood` streams of 96 tokens in flight (each replaced when it ends), and after
   `--warm-s` the quiet key sends the same requests beside it;
3. **fcfs**: the same, with the quiet requests sent under the flooding key: one tenant, whose own order is arrival,
   so this is what first come, first served gives on the same traffic;
4. **shares**: four keys of weights 1, 1, 1 and 3 each keep `--flood` / 4 streams in flight.

Time to first token is the client's (send -> first streamed text). Throughput and shares are output tokens as the
server counted them per key over `--measure-s` (the `fair_share` rows of /v1/stats, read at both ends of the
window), with the engine's own cost from its last steps (decode tokens per second of steps, and how many were
first-token steps); fair share and first come first served alternate for `--rounds` rounds (the machine's speed
drifts), TTFTs pooled and throughputs averaged.
Targets: the quiet tenant's TTFT p50 at most 2x alone (p99 at most 3x), total throughput at least 0.95x first come
first served, each share within 5% of its weight's. About 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import cpu_times, default_model_dir, machine, make_adapters, steal_share, write_json
from benchmarks.serving import PROMPTS, Result, free_port, one, start_server, stop_server, summary, wait_healthy
from loraplex.server.auth import key_id

ADMIN = "sk-bench-admin"
QUIET, FLOOD = "sk-quiet", "sk-flood"
WEIGHTED = {"sk-w1a": 1, "sk-w1b": 1, "sk-w1c": 1, "sk-w3": 3}
QUIET_PROMPT = "Summarise in one sentence why the sky is blue, for a reader who has never studied physics:"
QUIET_TOKENS, FLOOD_TOKENS, QUIET_GAP_S = 16, 96, 1.5


def keys_file(path: Path) -> Path:
    """Every key may use every adapter; the flooding ones may hold all their streams (the door is not measured)."""
    keys: dict[str, Any] = {ADMIN: {"adapters": ["*"], "admin": True}, QUIET: {"adapters": ["*"]},
                            FLOOD: {"adapters": ["*"], "max_in_flight": 1000}}
    keys.update({k: {"adapters": ["*"], "weight": w, "max_in_flight": 1000} for k, w in WEIGHTED.items()})
    path.write_text(json.dumps({"keys": keys}))
    return path


def client(key: str) -> httpx.AsyncClient:
    # No connection cap: a capped pool would queue requests in the client and hide queueing in the server.
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0), trust_env=False, headers={"Authorization": f"Bearer {key}"},
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def stats(url: str) -> dict[str, Any]:
    async with client(ADMIN) as c:
        r = await c.get(url + "/v1/stats")
        r.raise_for_status()
        return dict(r.json())


async def served(url: str) -> dict[str, int]:
    """Output tokens per tenant (key id) since start, as the server counts them."""
    return {row["tenant"]: row["output_tokens"] for row in (await stats(url))["fair_share"]["tenants"]}


Flood = tuple[httpx.AsyncClient, list[asyncio.Task[None]]]


def flood(url: str, key: str, adapter: str, streams: int, errors: list[dict[str, Any]]) -> Flood:
    """`streams` closed-loop workers on `key`: each sends a 96-token stream and another when it ends, until
    stopped (the server aborts what was in flight)."""
    c = client(key)

    async def worker(i: int) -> None:
        while True:
            r = await one(c, url, adapter, PROMPTS[i % len(PROMPTS)], FLOOD_TOKENS)
            if r.error is not None:
                errors.append(r.error)
                await asyncio.sleep(0.5)

    return c, [asyncio.create_task(worker(i)) for i in range(streams)]


async def stop(floods: list[Flood]) -> None:
    tasks = [t for _, ts in floods for t in ts]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c, _ in floods:
        await c.aclose()


async def quiet(url: str, key: str, adapter: str, n: int) -> list[Result]:
    """`n` 16-token streams, one every 1.5 s (open loop: sent on time whether or not the last has answered)."""
    async with client(key) as c:
        start, tasks = time.perf_counter(), []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * QUIET_GAP_S - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, url, adapter, QUIET_PROMPT, QUIET_TOKENS)))
        return list(await asyncio.gather(*tasks))


def ttft(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.times]
    return {**summary([r.times[0] - r.sent for r in ok]), "n": len(ok),
            "errors": [r.error for r in results if r.error is not None]}


def stolen(share: float | None) -> str:
    """A phase's steal_share (CPU time the hypervisor gave other guests), for its line."""
    return "" if share is None else f" (steal {100 * share:.0f}%{'; NOT A CLEAN FIGURE' if share > 0.05 else ''})"


async def beside_flood(url: str, quiet_key: str, args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    """The quiet requests (under `quiet_key`) beside the flood; their results, and every tenant's output tokens per
    second over the measured window with the median step time of the full batch."""
    errors: list[dict[str, Any]] = []
    floods = [flood(url, FLOOD, "a1", args.flood, errors)]
    try:
        await asyncio.sleep(args.warm_s)
        before, t0 = await served(url), time.perf_counter()
        q = asyncio.create_task(quiet(url, quiet_key, "a0", args.quiet_requests))
        await asyncio.sleep(args.measure_s)
        after, t1 = await served(url), time.perf_counter()
        log = (await stats(url))["batch"]["steps"]  # the engine's last 128 steps, up to the window's end
        results = await q  # the last quiet requests may answer after the window (first come, first served)
    finally:
        await stop(floods)
    full = sorted(s["duration_s"] for s in log if s["batch_size"] >= 32)
    decoded = [sum(t["decode"] for t in s["tokens"].values()) for s in log]
    own = [s["duration_s"] for s, d in zip(log, decoded) if d == 0]  # first-token steps: prompts only
    return results, {"tokens_per_s": (sum(after.values()) - sum(before.values())) / (t1 - t0), "window_s": t1 - t0,
                     "full_batch_step_ms_p50": 1e3 * full[len(full) // 2] if full else None,
                     # What the scheduler decides, whatever the machine's speed: decode tokens in a step.
                     "decode_tokens_per_step": sum(decoded) / len(log),
                     # ... and per second of the engine's steps (idle time and the HTTP side left out).
                     "decode_tokens_per_busy_s": sum(decoded) / sum(s["duration_s"] for s in log),
                     "first_token_steps": len(own), "steps": len(log),
                     "first_token_step_ms_p50": 1e3 * sorted(own)[len(own) // 2] if own else None,
                     "flood_errors": errors[:5], "flood_error_count": len(errors)}


def pooled(runs: list[tuple[list[Result], dict[str, Any]]]) -> dict[str, Any]:
    """Rounds of one policy: the quiet TTFTs pooled, the throughput and step time averaged, each round listed."""
    rounds = [r for _, r in runs]
    steps = [r["full_batch_step_ms_p50"] for r in rounds if r["full_batch_step_ms_p50"] is not None]
    return {"quiet_ttft_ms": ttft([x for res, _ in runs for x in res]),
            "tokens_per_s": sum(r["tokens_per_s"] for r in rounds) / len(rounds),
            "decode_tokens_per_step": sum(r["decode_tokens_per_step"] for r in rounds) / len(rounds),
            "decode_tokens_per_busy_s": sum(r["decode_tokens_per_busy_s"] for r in rounds) / len(rounds),
            "first_token_steps": sum(r["first_token_steps"] for r in rounds),
            "steps": sum(r["steps"] for r in rounds),
            # A first token beside the flood waits for the step in progress and then takes one full-batch step.
            "full_batch_step_ms_p50": sum(steps) / len(steps) if steps else None,
            "flood_error_count": sum(r["flood_error_count"] for r in rounds), "rounds": rounds}


async def shares(url: str, args: argparse.Namespace) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    floods = [flood(url, key, f"a{2 + i}", args.flood // len(WEIGHTED), errors) for i, key in enumerate(WEIGHTED)]
    try:
        await asyncio.sleep(args.warm_s)
        before, t0 = await served(url), time.perf_counter()
        await asyncio.sleep(args.measure_s)
        after, t1 = await served(url), time.perf_counter()
    finally:
        await stop(floods)
    tokens = {k: after.get(key_id(k), 0) - before.get(key_id(k), 0) for k in WEIGHTED}
    total, weights = sum(tokens.values()), sum(WEIGHTED.values())
    rows = [{"key": k, "weight": w, "tokens": tokens[k], "share": tokens[k] / total, "wanted": w / weights,
             "error": tokens[k] / total / (w / weights) - 1} for k, w in WEIGHTED.items()]
    return {"tenants": rows, "tokens_per_s": total / (t1 - t0), "window_s": t1 - t0,
            "max_abs_error": max(abs(r["error"]) for r in rows), "flood_errors": errors[:5],
            "flood_error_count": len(errors)}


async def scenario(url: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = cpu_times()
    alone = ttft(await quiet(url, QUIET, "a0", args.alone_requests))
    alone["steal"] = steal_share(t0, cpu_times())
    print(f"alone: quiet TTFT p50 {alone['p50']:.0f} ms, p99 {alone['p99']:.0f} ms{stolen(alone['steal'])}", flush=True)
    runs: dict[str, list[tuple[list[Result], dict[str, Any]]]] = {"fair": [], "fcfs": []}
    for i in range(args.rounds):  # alternated, so that a drift in the machine's speed falls on both alike
        for policy, key in (("fair", QUIET), ("fcfs", FLOOD)):
            t0 = cpu_times()
            results, r = await beside_flood(url, key, args)
            r["steal"] = steal_share(t0, cpu_times())
            runs[policy].append((results, r))
            t = ttft(results)
            print(f"round {i + 1}, {policy}: quiet TTFT p50 {t['p50']:.0f} ms, p99 {t['p99']:.0f} ms; "
                  f"{r['tokens_per_s']:.0f} tok/s{stolen(r['steal'])}", flush=True)
    fair, fcfs = pooled(runs["fair"]), pooled(runs["fcfs"])
    t0 = cpu_times()
    sh = await shares(url, args)
    sh["steal"] = steal_share(t0, cpu_times())
    print("shares: " + ", ".join(f"w{r['weight']} {100 * r['share']:.1f}% (wanted {100 * r['wanted']:.1f}%)"
                                 for r in sh["tenants"]) + stolen(sh["steal"]), flush=True)
    return {"alone": alone, "fair": fair, "fcfs": fcfs, "shares": sh}


def main() -> None:
    ap = argparse.ArgumentParser(description="fair share between tenants over HTTP")
    ap.add_argument("--flood", type=int, default=160, help="streams the flooding tenant keeps in flight")
    ap.add_argument("--quiet-requests", type=int, default=20, help="the quiet key's requests in each round")
    # The baseline of both ratios: its p99 is its largest request's below 100, so more of them than a round's.
    ap.add_argument("--alone-requests", type=int, default=40, help="the quiet key's requests alone")
    ap.add_argument("--measure-s", type=float, default=30.0)
    ap.add_argument("--warm-s", type=float, default=10.0, help="the flood runs this long before the window")
    ap.add_argument("--rounds", type=int, default=3, help="fair share and first come first served, alternated")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `loraplex serve` flags (last)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, log = Path(tmp) / "adapters", Path(tmp) / "server.log"
        make_adapters(default_model_dir(), root, 6)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(root, port, 16, log, ["--api-keys", str(keys_file(Path(tmp) / "keys.json")),
                                                  *args.server_args])
        try:
            wait_healthy(url, proc, log)
            for a in ("a0", "a1"):  # first-call costs stay out of the figures
                httpx.post(url + "/v1/completions", json={"model": a, "prompt": "Hi", "max_tokens": 4}, timeout=120,
                           trust_env=False, headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
            res = asyncio.run(scenario(url, args))
        finally:
            code = stop_server(proc)
    alone, fair, fcfs = res["alone"], res["fair"], res["fcfs"]
    out = {"machine": machine(), "flood": args.flood, "quiet_requests": args.quiet_requests,
           "alone_requests": args.alone_requests,
           "quiet_tokens": QUIET_TOKENS, "flood_tokens": FLOOD_TOKENS, "quiet_gap_s": QUIET_GAP_S,
           "measure_s": args.measure_s, "warm_s": args.warm_s, "rounds": args.rounds,
           "server_args": args.server_args, **res,
           "ttft_p50_ratio": fair["quiet_ttft_ms"]["p50"] / alone["p50"],
           "ttft_p99_ratio": fair["quiet_ttft_ms"]["p99"] / alone["p99"],
           "fcfs_ttft_p50_ratio": fcfs["quiet_ttft_ms"]["p50"] / alone["p50"],
           # Paired by round (each fair round beside the first come first served round after it), the median: one
           # slow stretch of the machine moves the mean of either policy by more than the scheduler does.
           "throughput_ratio": statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                                 for a, b in zip(fair["rounds"], fcfs["rounds"])),
           "mean_throughput_ratio": fair["tokens_per_s"] / fcfs["tokens_per_s"],
           "tokens_per_step_ratio": fair["decode_tokens_per_step"] / fcfs["decode_tokens_per_step"],
           "tokens_per_busy_s_ratio": statistics.median(a["decode_tokens_per_busy_s"] / b["decode_tokens_per_busy_s"]
                                                        for a, b in zip(fair["rounds"], fcfs["rounds"])),
           "server_exit_code": code}
    print(f"quiet TTFT beside the flood / alone: p50 {out['ttft_p50_ratio']:.2f}x, p99 {out['ttft_p99_ratio']:.2f}x "
          f"(first come, first served: p50 {out['fcfs_ttft_p50_ratio']:.1f}x); throughput / fcfs "
          f"{out['throughput_ratio']:.3f} (decode tokens per step {out['tokens_per_step_ratio']:.3f}, per second of "
          f"steps {out['tokens_per_busy_s_ratio']:.3f}); largest share "
          f"error {100 * res['shares']['max_abs_error']:.1f}%")
    print(f"written to {write_json('fair_share', out)}")


if __name__ == "__main__":
    main()
