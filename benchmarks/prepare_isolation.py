"""Prepare isolation: a stream's inter-token gaps while another client sends expensive schemas and huge prompts.

    .venv/bin/python -m benchmarks.prepare_isolation --label after
    .venv/bin/python -m benchmarks.prepare_isolation --label before --src /tmp/before/src   # an older checkout

One `loraplex serve` (the embedded model, no adapters; its code from --src, default this checkout) in a
subprocess. The victim: streamed chat completions of 128 tokens each (greedy, ignore_eos), one after another; a
gap is the time between two content chunks as the client receives them. Quiet: the victims alone. Loaded: the
same victims while two aggressor clients send, back to back, (a) JSON schemas of 300 alternatives of 20 patterned
fields each, a new one every time so none is cached (~0.7 s to compile on one AVX2 core), max_tokens 1, and (b) chat
messages of 300,000 characters of made-up words (each one new, so the tokenizer's cache cannot help; over
--max-model-len, so refused once tokenized). A probe meanwhile reads /health every 50 ms. Figures: gap
p50/p99/max per phase, /health latency max, aggressor requests answered. Run once per checkout with a --label;
the labels accumulate in one JSON file. Measure "before" from an older tree: git archive <commit> src | tar -x -C DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, machine, percentile, write_json
from benchmarks.serving import free_port, stop_server, wait_healthy

VICTIM_TOKENS = 128
HUGE_CHARS = 300_000


def expensive_schema(salt: int, alternatives: int = 300, fields: int = 20) -> dict[str, Any]:
    """anyOf of `alternatives` objects of `fields` patterned strings: what one compile of ~0.7 s looks like here."""
    return {"anyOf": [{"type": "object", "additionalProperties": False,
                       "properties": {f"k{j}_{i}_{salt}": {"type": "string", "pattern": f"[a-z]{{{i % 5 + 1},9}}x{j}"}
                                      for i in range(fields)},
                       "required": [f"k{j}_{i}_{salt}" for i in range(fields)]} for j in range(alternatives)]}


def huge_text(seed: int) -> str:
    """HUGE_CHARS of made-up words, different for every seed: the tokenizer's word cache cannot shortcut them."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words, size = [], 0
    while size < HUGE_CHARS:
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
        size += len(words[-1]) + 1
    return " ".join(words)


async def victim(client: httpx.AsyncClient, url: str, model: str) -> list[float]:
    """One streamed answer; the seconds between consecutive content chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": VICTIM_TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
    arrivals: list[float] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                arrivals.append(time.perf_counter())
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def aggressor(url: str, model: str, kind: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Back-to-back requests of one kind, on its own thread: building the bodies never delays the victim's loop."""
    i = 0
    with httpx.Client(timeout=600, trust_env=False) as client:
        while not stop.is_set():
            i += 1
            if kind == "schema":
                body = {"model": model, "messages": [{"role": "user", "content": "Fill the form."}], "max_tokens": 1,
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": f"s{i}", "schema": expensive_schema(i)}}}
            else:
                body = {"model": model, "messages": [{"role": "user", "content": huge_text(i)}], "max_tokens": 1}
            r = client.post(url + "/v1/chat/completions", json=body)
            counts[f"{kind}_{r.status_code}"] = counts.get(f"{kind}_{r.status_code}", 0) + 1


async def health_probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event) -> list[float]:
    seconds = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await client.get(url + "/health")
        seconds.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    return seconds


def gap_summary(gaps: list[float]) -> dict[str, float]:
    return {"gaps": len(gaps), "p50_ms": 1e3 * percentile(gaps, 50), "p99_ms": 1e3 * percentile(gaps, 99),
            "max_ms": 1e3 * max(gaps)}


async def measure(url: str, model: str, victims: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        await victim(client, url, model)  # warm-up: every path once
        await client.post(url + "/v1/chat/completions", json={  # the grammar engine's one-time set-up
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "response_format": {"type": "json_object"}})
        quiet = [g for _ in range(victims) for g in await victim(client, url, model)]
        stop, stop_probe = threading.Event(), asyncio.Event()
        counts: dict[str, int] = {}  # "<kind>_<status>" -> answers
        attackers = [threading.Thread(target=aggressor, args=(url, model, kind, stop, counts))
                     for kind in ("schema", "prompt")]
        for t in attackers:
            t.start()
        probe = asyncio.create_task(health_probe(client, url, stop_probe))
        await asyncio.sleep(1.0)  # the aggressors' first requests are in
        loaded = [g for _ in range(victims) for g in await victim(client, url, model)]
        stop.set()
        stop_probe.set()
        health = await probe
        for t in attackers:
            t.join()
    return {"quiet": gap_summary(quiet), "loaded": gap_summary(loaded),
            "health_max_ms": 1e3 * max(health), "health_p99_ms": 1e3 * percentile(health, 99),
            "aggressor_answers": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="what checkout this run measures, e.g. before / after")
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                    help="the loraplex source tree the server runs")
    ap.add_argument("--victims", type=int, default=3, help="victim streams per phase")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    env = {**os.environ, "PYTHONPATH": str(args.src)}
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), "--max-model-len", "4096"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, proc, log)
        model = httpx.get(url + "/v1/models", trust_env=False).json()["data"][0]["id"]
        run = asyncio.run(measure(url, model, args.victims))
    finally:
        stop_server(proc)
    path = RESULTS / "prepare_isolation.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["machine"] = machine()
    data["runs"][args.label] = {**run, "src": str(args.src)}
    print(json.dumps(data["runs"][args.label], indent=2))
    write_json("prepare_isolation", data)


if __name__ == "__main__":
    main()
