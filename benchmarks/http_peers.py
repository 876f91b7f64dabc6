"""Serving over HTTP against the peers: 64 concurrent streams over 8 adapters, the same requests to each server.

    .venv/bin/python -m benchmarks.http_peers --adapters results/adapters [--streams 64] [--max-tokens 64]

Each system runs as its own OpenAI-compatible server process on this machine, one after the other:
- loraplex: `loraplex serve --adapter-dir` (dtype auto);
- vLLM CPU: `vllm.entrypoints.openai.api_server --enable-lora --lora-modules a0=... --max-loras 8` from .venv-vllm,
  in the same dtype, once with its default threading (one core reserved) and once with both cores bound;
- llama.cpp: `llama-server` with the adapters as GGUF (benchmarks/peers/llama_cpp.py), each request's adapter in
  its `lora` field.
The workload: `--streams` streaming /v1/completions sent at once (closed loop, one request per client), request i
on adapter i % 8, the shared chat-templated prompts, greedy, EOS ignored, `--max-tokens` each. Figures: output
tokens/s from the first send to the last token, TTFT and time per output token p50/p99, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import default_model_dir, machine, make_adapters, warmup, workload_prompts, write_json
from benchmarks.peers import llama_cpp
from benchmarks.serving import Result, free_port, one, stop_server, summary, wait_healthy
from loraplex.hardware import resolve_dtype

VLLM_PYTHON = Path(os.environ.get("VLLM_VENV", ".venv-vllm")) / "bin" / "python"


async def burst(url: str, jobs: list[tuple[str, str, dict[str, Any] | None]], max_tokens: int) -> list[Result]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits, trust_env=False) as client:
        return list(await asyncio.gather(*(one(client, url, model, prompt, max_tokens, extra)
                                           for model, prompt, extra in jobs)))


def measure(name: str, url: str, jobs: list[tuple[str, str, dict[str, Any] | None]], max_tokens: int) -> dict[str, Any]:
    warm = [(model, p, extra) for (model, _, extra), p in zip(jobs[:8], warmup([p for _, p, _ in jobs[:8]]))]
    asyncio.run(burst(url, warm, 4))  # warm-up: every adapter once, first-call costs out of the figures
    results = asyncio.run(burst(url, jobs, max_tokens))
    ok = [r for r in results if r.error is None and r.times]
    errors = [r.error for r in results if r.error is not None]
    wall = max(r.done for r in ok) - min(r.sent for r in results) if ok else float("nan")
    out = {"tokens_per_s": sum(r.tokens for r in ok) / wall, "wall_s": wall, "completed": len(ok),
           "errors": len(errors), "error_details": errors[:5],
           "ttft_ms": summary([r.times[0] - r.sent for r in ok]),
           "tpot_ms": summary([(r.times[-1] - r.times[0]) / (r.tokens - 1) for r in ok if r.tokens > 1])}
    print(f"{name}: {len(ok)}/{len(jobs)} streams, {out['tokens_per_s']:.1f} tok/s, TTFT p50 "
          f"{out['ttft_ms']['p50']:.0f} ms p99 {out['ttft_ms']['p99']:.0f} ms, {len(errors)} errors", flush=True)
    return out


def serve(name: str, cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None,
          jobs: list[tuple[str, str, dict[str, Any] | None]] = (), max_tokens: int = 64) -> dict[str, Any]:  # type: ignore[assignment]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_healthy(url, proc, log, timeout=600)
        return measure(name, url, jobs, max_tokens)
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=Path, default=None, help="directory of PEFT adapters a0..a7 (made if absent)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["vllm", "llama_cpp"])
    args = ap.parse_args()
    choice = resolve_dtype("auto")
    model_dir = default_model_dir()
    from transformers import AutoTokenizer

    prompts = workload_prompts(AutoTokenizer.from_pretrained(model_dir), args.streams)
    out: dict[str, Any] = {"machine": machine(), "dtype": choice.name, "streams": args.streams,
                           "max_tokens": args.max_tokens, "adapters": 8}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp) / "adapters"
        names = make_adapters(model_dir, root, 8)
        by_name = [(names[i % 8], prompts[i], None) for i in range(args.streams)]
        log = Path(tmp) / "server.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # root holds more adapters than these 8 (a0..a255 in the suite): only the 8 named are ever requested
        out["loraplex"] = serve("loraplex", [sys.executable, "-m", "loraplex.cli", "serve", "--adapter-dir", str(root),
                                             "--port", str(port), "--max-loras", "8"], url, log,
                                jobs=by_name, max_tokens=args.max_tokens)
        if "vllm" not in args.skip and VLLM_PYTHON.exists():
            cores = os.cpu_count() or 1
            cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--dtype", choice.name, "--enable-lora", "--max-loras", "8", "--max-lora-rank", "16",
                   "--max-model-len", "1024", "--port", str(port), "--host", "127.0.0.1", "--seed", "0",
                   "--lora-modules", *[f"{n}={root / n}" for n in names]]
            for label, env in (("vllm", {}), ("vllm_all_cores", {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
                                                                  "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})):
                out[label] = serve(label, cmd, url, log, env={"VLLM_CPU_KVCACHE_SPACE": "2", **env},
                                   jobs=by_name, max_tokens=args.max_tokens)
        if "llama_cpp" not in args.skip:
            outtype = llama_cpp.OUTTYPE[choice.name]
            base, loras = llama_cpp.convert(model_dir, [root / n for n in names], outtype)
            server = llama_cpp.Server(base, loras, args.streams, 192, outtype)
            by_lora = [("base", prompts[i], {"lora": [{"id": i % 8, "scale": 1.0}]}) for i in range(args.streams)]
            with server:
                out["llama_cpp"] = measure("llama.cpp", server.url, by_lora, args.max_tokens)
    print(f"written to {write_json('http_peers', out)}")


if __name__ == "__main__":
    main()
