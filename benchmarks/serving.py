"""Serving over HTTP: Poisson arrivals across 64 adapters with Zipf popularity, streaming completions.

    .venv/bin/python -m benchmarks.serving [--adapters 64] [--requests 200] [--rate 4.0] [--zipf 1.1]
        [--max-tokens 64] [--max-loras 16] [--seed 0] [--port 0] [--adapter-root DIR]

Makes `--adapters` PEFT adapters (r=16 on q/k/v/o of the default model) in a temp dir, starts
`loraplex serve --adapter-dir <them> --max-loras 16` as a subprocess, waits for /health, warms up, then
sends an open-loop workload: arrival times are a Poisson process at `--rate` requests/s (seeded), so
requests keep arriving whether or not earlier ones finished, as real clients do; each request's
adapter is drawn from a Zipf(s) law over the adapter names (a0 the most popular), so a few tenants
are hot while a long tail is cold and loaded from disk just in time, competing for the 16 device slots.
Every request streams `/v1/completions` (greedy, `ignore_eos`, `max_tokens` tokens, usage included).

Per request: TTFT (send -> first streamed text) and TPOT ((last token time - first) / (tokens - 1)).
Overall: output tokens/s and requests/s from the first send to the last completion. Any non-200 or
in-band stream error is recorded with its body. Defaults (200 requests at 4 req/s, 64 tokens each:
~256 tok/s offered, about half the engine's batch-32 decode rate) take about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
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

from benchmarks.common import default_model_dir, machine, make_adapters, percentile, write_json

# Varied lengths and kinds, so prefill cost differs between requests as it does in real traffic.
PROMPTS = ["Once upon a time,", "Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "def fibonacci(n):", "The three most important causes of the French Revolution were",
           "Q: Why is the sky blue?\nA:", "Summarise the water cycle for a ten-year-old, step by step, in plain words:"]


@dataclass
class Result:
    adapter: str
    sent: float
    times: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    done: float = 0.0  # when the stream ended
    tokens: int = 0
    error: dict[str, Any] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, port: int, max_loras: int, log: Path, extra: list[str] = ()) -> subprocess.Popen[bytes]:  # type: ignore[assignment]
    # The server's output goes to a file, not a pipe: an undrained pipe fills and blocks the server mid-run.
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--adapter-dir", str(root), "--port", str(port),
           "--max-loras", str(max_loras), "--max-cpu-loras", "32", *extra]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the server drains, up to its 30 s --drain-timeout, then exits 0); SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print("server ignored SIGTERM for 60 s: killed", file=sys.stderr)
            proc.kill()
            proc.wait()
    return proc.returncode


async def one(client: httpx.AsyncClient, url: str, adapter: str, prompt: str, max_tokens: int,
              extra: dict[str, Any] | None = None) -> Result:
    """One streaming completion; a token time is taken as each SSE chunk with text arrives. `extra` adds to
    (or overrides) the body: how a peer that does not choose adapters by `model` is told which to use."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    res = Result(adapter, time.perf_counter())
    usage = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = {"adapter": adapter, "status": r.status_code, "body": (await r.aread()).decode()}
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # errors after the 200 header arrive in-band
                    res.error = {"adapter": adapter, "status": 200, "body": line[6:]}
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    res.times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as e:
        res.error = {"adapter": adapter, "status": None, "body": f"{type(e).__name__}: {e}"}
    res.done = time.perf_counter()
    # usage is exact; chunk counting undercounts when detokenisation holds back a partial character
    res.tokens = usage or len(res.times)
    if res.error is None and not res.times:
        res.error = {"adapter": adapter, "status": 200, "body": "stream ended without any text"}
    return res


async def workload(url: str, names: list[str], args: argparse.Namespace) -> list[Result]:
    rng = random.Random(args.seed)
    weights = [1.0 / rank ** args.zipf for rank in range(1, len(names) + 1)]
    gaps = [0.0] + [rng.expovariate(args.rate) for _ in range(args.requests - 1)]
    adapters = rng.choices(names, weights, k=args.requests)
    # No connection cap: a capped pool would queue requests in the client and hide queueing in the server.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, trust_env=False) as client:
        start, tasks = time.perf_counter(), []
        # Sleep to absolute arrival times, so event-loop lag does not lower the offered rate.
        for i, (at, adapter) in enumerate(zip(itertools.accumulate(gaps), adapters)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, adapter, PROMPTS[i % len(PROMPTS)], args.max_tokens)))
        return list(await asyncio.gather(*tasks))


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    return {"p50": 1e3 * percentile(values, 50), "p99": 1e3 * percentile(values, 99),
            "mean": 1e3 * sum(values) / len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Poisson/Zipf multi-adapter serving benchmark over HTTP")
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-loras", type=int, default=16, help="the server's device adapter slots")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--adapter-root", type=Path, default=None, help="a dir of PEFT adapters a0..aN (made if absent)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `loraplex serve` flags (last)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, log = args.adapter_root or Path(tmp), Path(tmp) / "server.log"
        names = make_adapters(default_model_dir(), root, args.adapters)  # finds the model without loading an engine
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(root, port, args.max_loras, log, args.server_args)
        try:
            wait_healthy(url, proc, log)
            for n in names[:2]:  # warm-up: first-call costs (allocator, first adapter loads) stay out of the figures
                r = httpx.post(url + "/v1/completions", json={"model": n, "prompt": "Hi", "max_tokens": 4},
                               timeout=120, trust_env=False)
                r.raise_for_status()
            results = asyncio.run(workload(url, names, args))
        finally:
            code = stop_server(proc)
            server_log = log.read_text() if log.exists() else ""
    ok = [r for r in results if r.error is None and r.times]
    errors = [r.error for r in results if r.error is not None]
    wall = max(r.done for r in ok) - min(r.sent for r in results) if ok else float("nan")
    out: dict[str, Any] = {
        "machine": machine(), "requests": args.requests, "rate": args.rate, "zipf": args.zipf,
        "adapters": args.adapters, "max_tokens": args.max_tokens, "max_loras": args.max_loras, "seed": args.seed,
        "ttft_ms": summary([r.times[0] - r.sent for r in ok]),
        "tpot_ms": summary([(r.times[-1] - r.times[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]),
        "tokens_per_s": sum(r.tokens for r in ok) / wall, "requests_per_s": len(ok) / wall, "wall_s": wall,
        "completed": len(ok), "distinct_adapters": len({r.adapter for r in results}),
        "errors": len(errors), "error_details": errors, "server_exit_code": code,
        # machine() describes this client process; the server keeps one core free for its event loop (serve.py)
        "server_torch_threads": int(m[1]) if (m := re.search(r"torch uses (\d+) CPU threads", server_log)) else None,
    }
    print(f"serving: {len(ok)}/{args.requests} requests at {args.rate} req/s over {out['distinct_adapters']} "
          f"adapters in {wall:.1f} s: {out['tokens_per_s']:.0f} tok/s, {out['requests_per_s']:.2f} req/s")
    print(f"  TTFT p50 {out['ttft_ms']['p50']:.0f} ms, p99 {out['ttft_ms']['p99']:.0f} ms; "
          f"TPOT p50 {out['tpot_ms']['p50']:.1f} ms, p99 {out['tpot_ms']['p99']:.1f} ms; {len(errors)} errors; "
          f"server exit code {code}")
    for e in errors[:5]:
        print(f"  error: {e}", file=sys.stderr)
    if errors or code != 0:  # say what the server said, since the temp dir with its log is gone
        print("server log tail:\n" + server_log[-3000:], file=sys.stderr)
    print(f"written to {write_json('serving', out)}")


if __name__ == "__main__":
    main()
