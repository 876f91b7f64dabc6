"""What batch-invariant serving costs (issue 41): decode tokens per second at batch 1, 8 and 32 with 8 adapters
mixed, and the prefill time of the same requests, batch-invariant (`batch_invariant=True`: the base linears in
row tiles, models/cpu_gemm.py) against today's path, in one run; and how many greedy answers of the batch equal
their solo answers on each path.

    .venv/bin/python -m benchmarks.batch_invariance [--batches 1 8 32] [--max-tokens 32] [--reps 3]

Offline, prefix cache off, greedy, EOS ignored, the model dtype resolved here (bf16 where the CPU multiplies it
natively). Prefill: the wall time of the batch at max_tokens=1. Decode: the batch's tokens after the first, over
the time the full run takes beyond that. The two engines are built once and measured in turn, each repetition,
so that drift in the machine falls on both; the median repetition is reported.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import default_model_dir, machine, make_adapters, round_robin, warmup, workload_prompts, write_json
from loraplex import LLM, SamplingParams

MODES = {"today": False, "batch-invariant": True}


def timed(llm: LLM, prompts: list[str], adapters: list[str], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--adapters", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(default_model_dir(), root, 8)
        llms = {mode: LLM(adapter_dir=str(root), max_loras=8, enable_prefix_caching=False, batch_invariant=on)
                for mode, on in MODES.items()}
        prompts = workload_prompts(llms["today"].tokenizer, max(args.batches))
        adapters = round_robin(names, max(args.batches))
        for llm in llms.values():
            llm.generate(warmup(prompts[:8]), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters[:8])
        # Greedy answers alone, for the equality count (the tiled path must give every request its solo answer).
        solo = {mode: [timed(llm, [p], [a], args.max_tokens)[1][0] for p, a in zip(prompts, adapters)]
                for mode, llm in llms.items()}
        times: dict[tuple[str, int, int], list[float]] = {}
        equal: dict[tuple[str, int], int] = {}
        for _ in range(args.reps):
            for b in args.batches:
                for mode, llm in llms.items():
                    for n in (1, args.max_tokens):
                        dt, tokens = timed(llm, prompts[:b], list(adapters[:b]), n)
                        times.setdefault((mode, b, n), []).append(dt)
                        if n == args.max_tokens:
                            equal[(mode, b)] = sum(t == s for t, s in zip(tokens, solo[mode][:b]))
        rows: list[dict[str, Any]] = []
        for b in args.batches:
            for mode in MODES:
                prefill = statistics.median(times[(mode, b, 1)])
                full = statistics.median(times[(mode, b, args.max_tokens)])
                rows.append({"mode": mode, "batch": b, "prefill_s": prefill,
                             "decode_tokens_per_s": b * (args.max_tokens - 1) / (full - prefill),
                             "tokens_per_s": b * args.max_tokens / full, "equal_to_solo": equal[(mode, b)]})
                r = rows[-1]
                print(f"batch {b:3} {mode:16} prefill {prefill * 1e3:7.1f} ms  decode {r['decode_tokens_per_s']:7.1f} tok/s"
                      f"  overall {r['tokens_per_s']:7.1f} tok/s  solo answers {r['equal_to_solo']}/{b}", flush=True)
        detail = llms["batch-invariant"].engine.facts.batch_invariance.detail
    out = write_json("batch_invariance", {"machine": machine(), "max_tokens": args.max_tokens, "reps": args.reps,
                                          "adapters": 8, "invariance": detail, "rows": rows})
    print(f"written to {out}")


if __name__ == "__main__":
    main()
