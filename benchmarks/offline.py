"""loraplex offline throughput: the shared workload over 0 (base), 1, 8 and 32 adapters, and the scaling
sweep of distinct adapters in a request stream from 1 to 256.

    .venv/bin/python -m benchmarks.offline [--requests 32 --max-tokens 64] [--stream 256 --stream-tokens 32]

Offline: 32 requests x 64 new tokens, greedy, EOS ignored, adapters round-robin (request i uses adapter
i % k), all submitted at once; one warm-up pass, then the timed pass. Scaling: a stream of 256 requests
whose adapters cycle over k distinct names, max_loras 32 device slots, the adapters cold on disk at the
start of each point (host tier of 64): slot swaps and disk loads are part of the figure.

The prefix cache is off here (and in the cold-load, quantized and structured benchmarks): the prompts share
the chat template's system prompt, which base-only requests (one namespace) would find cached and requests over
k adapters (k namespaces) mostly would not, so the ratios would mix caching into the LoRA cost they measure.
benchmarks.prefix_cache measures the cache; the HTTP benchmarks run every server with its defaults.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (default_model_dir, machine, make_adapters, round_robin, warmup, workload_prompts,
                               write_json)
from loraplex import LLM, SamplingParams
from loraplex.hardware import resolve_dtype


def timed_generate(llm: LLM, prompts: list[str], adapters: list[str | None], max_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def offline(root: Path, names: list[str], counts: list[int], requests: int, max_tokens: int) -> dict[str, Any]:
    llm = LLM(adapter_dir=str(root), max_loras=max(counts), max_cpu_loras=max(counts), enable_prefix_caching=False)
    prompts = workload_prompts(llm.tokenizer, requests)
    results: dict[str, Any] = {}
    for k in counts:
        adapters: list[str | None] = [None] * requests if k == 0 else list(round_robin(names[:k], requests))
        timed_generate(llm, warmup(prompts), adapters, 8)  # warm-up: loads the adapters, touches every code path
        r = timed_generate(llm, prompts, adapters, max_tokens)
        results["base" if k == 0 else str(k)] = r
        print(f"loraplex offline, {'base only' if k == 0 else f'{k} adapters'}: {r['tokens_per_s']:.1f} tok/s", flush=True)
    return results


def scaling(root: Path, names: list[str], points: list[int], stream: int, max_tokens: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for k in points:
        llm = LLM(adapter_dir=str(root), max_loras=32, max_num_seqs=32, max_cpu_loras=64,  # cold tiers each point
                  enable_prefix_caching=False)
        prompts = workload_prompts(llm.tokenizer, stream)
        timed_generate(llm, warmup(prompts[:4]), [None] * 4, 4)  # warm the base path only
        r = timed_generate(llm, prompts, list(round_robin(names[:k], stream)), max_tokens)
        r["adapter_loads"] = dict(llm.engine.adapter_stats().loads)  # tier -> loads (host: from disk)
        results[str(k)] = r
        print(f"loraplex scaling, {k} distinct adapters in a stream of {stream}: {r['tokens_per_s']:.1f} tok/s", flush=True)
        del llm
        gc.collect()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 1, 8, 32])
    ap.add_argument("--stream", type=int, default=256)
    ap.add_argument("--stream-tokens", type=int, default=32)
    ap.add_argument("--points", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--adapters", type=Path, default=None, help="directory of PEFT adapters a0..aN (made if absent)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(default_model_dir(), root, max(max(args.points), max(args.counts)))
        result = {
            "machine": machine(),
            "workload": {"requests": args.requests, "max_tokens": args.max_tokens, "dtype": resolve_dtype().name,
                         "adapters": "PEFT r=16 on q,k,v,o", "decoding": "greedy, EOS ignored"},
            "offline": offline(root, names, args.counts, args.requests, args.max_tokens),
            "scaling": {"stream": args.stream, "max_tokens": args.stream_tokens, "max_loras": 32,
                        "points": scaling(root, names, args.points, args.stream, args.stream_tokens)},
        }
    print(f"written to {write_json('offline', result)}")


if __name__ == "__main__":
    main()
