"""Serving over HTTP: Poisson arrivals across 64 adapters with Zipf popularity, streaming completions.

    .venv/bin/python -m benchmarks.serving [--adapters 64 --requests 160 --rate 4 --zipf 1.1 --max-tokens 64]

Starts `loraplex serve --adapter-dir <64 PEFT adapters> --max-loras 16` as a subprocess, warms it up,
then sends an open-loop stream: inter-arrival times exponential at `--rate` requests/s (seeded), each
request's adapter drawn from a Zipf(s) law over the adapters (rank 1 the most popular), so a few
tenants are hot and a long tail is cold (loaded from disk just in time). Every request streams
`/v1/completions` (greedy, `ignore_eos`, `max_tokens`). Measured per request: time to first token
(send -> first streamed token) and time per output token after the first; overall output tokens/s
from the first send to the last completion. The defaults take about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import TOPICS, default_model_dir, machine, make_adapters, percentile, write_json


@dataclass
class Result:
    adapter: str
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0
    error: str | None = None
    times: list[float] = field(default_factory=list)


EXTRA_ENV: dict[str, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def start_server(root: Path, port: int, max_loras: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--adapter-dir", str(root), "--port", str(port),
           "--max-loras", str(max_loras), "--max-cpu-loras", "32", "--max-num-seqs", "64"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **EXTRA_ENV})


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def one(client: httpx.AsyncClient, url: str, adapter: str, prompt: str, max_tokens: int) -> Result:
    """One streaming completion; token times are taken as each SSE chunk with text arrives."""
    res = Result(adapter)
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"{r.status_code}: {(await r.aread()).decode()[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    res.times.append(time.perf_counter())
                if chunk.get("usage"):
                    res.tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if res.times:
        res.ttft = res.times[0] - t0
        if res.tokens > 1:
            res.tpot = (res.times[-1] - res.times[0]) / (res.tokens - 1)
    return res


async def workload(url: str, names: list[str], args: argparse.Namespace) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    weights = zipf_weights(len(names), args.zipf)
    plan = [(rng.expovariate(args.rate), rng.choices(names, weights)[0], i) for i in range(args.requests)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        t0 = time.perf_counter()
        for gap, adapter, i in plan:  # open loop: arrivals do not wait for completions
            await asyncio.sleep(gap)
            prompt = f"Tell me a story about {TOPICS[i % len(TOPICS)]}, part {i + 1}."
            tasks.append(asyncio.create_task(one(client, url, adapter, prompt, args.max_tokens)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": 1e3 * percentile(values, 50), "p99": 1e3 * percentile(values, 99),
            "mean": 1e3 * sum(values) / len(values)} if values else {"p50": 0.0, "p99": 0.0, "mean": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter-root", type=Path, default=None, help="directory of PEFT adapters a0..aN (made if absent)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapter_root or Path(tmp)
        names = make_adapters(default_model_dir(), root, args.adapters)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(root, port, args.max_loras)  # requests name only the first `--adapters` of root
        try:
            wait_healthy(url, proc)
            for n in names[:2]:  # warm-up: first-call costs are not part of the figures
                httpx.post(url + "/v1/completions", json={"model": n, "prompt": "Hi", "max_tokens": 4}, timeout=120)
            results, wall = asyncio.run(workload(url, names, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = [r for r in results if r.error is None]
    errors = [f"{r.adapter}: {r.error}" for r in results if r.error is not None]
    tokens = sum(r.tokens for r in ok)
    out: dict[str, Any] = {
        "machine": machine(), "requests": args.requests, "rate": args.rate, "zipf": args.zipf, "adapters": args.adapters,
        "max_tokens": args.max_tokens, "max_loras": args.max_loras,
        "ttft_ms": summary([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summary([r.tpot for r in ok if r.tpot is not None]),
        "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "distinct_adapters": len({r.adapter for r in results}), "errors": len(errors), "error_samples": errors[:5],
    }
    print(f"serving: {len(ok)}/{args.requests} requests over {out['distinct_adapters']} adapters in {wall:.1f} s, "
          f"{out['tokens_per_s']:.0f} tok/s; TTFT p50 {out['ttft_ms']['p50']:.0f} ms p99 {out['ttft_ms']['p99']:.0f} ms; "
          f"TPOT p50 {out['tpot_ms']['p50']:.1f} ms p99 {out['tpot_ms']['p99']:.1f} ms; {len(errors)} errors")
    print(f"written to {write_json('serving', out)}")


if __name__ == "__main__":
    main()
