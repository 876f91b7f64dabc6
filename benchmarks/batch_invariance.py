"""What batch-invariant serving costs (issue 41): decode tokens per second at batch 1, 8 and 32 with 8 adapters
mixed, and the prefill time of the same requests, batch-invariant (`batch_invariant=True`: the base linears in
row tiles, attention per query; docs/serving.md#batch-invariance) against today's path, in one run; and how many
greedy answers of the batch equal their solo answers on each path.

    .venv/bin/python -m benchmarks.batch_invariance [--batches 1 8 32] [--max-tokens 32] [--reps 7] [--kernels torch]

Offline, prefix cache off, greedy, EOS ignored, the model dtype resolved here (bf16 where the CPU multiplies it
natively). Each engine step is timed: a step where every request has its prompt computed is a decode step
(decode tokens per second: their tokens over their time); the others hold prefill work (prefill: their summed
time). The two engines are built once and measured in turn, each repetition, so that drift in the machine falls
on both; the median repetition is reported, and the median of the repetitions' ratios (paired).
`--kernels torch` measures the torch path of a machine without a C++ compiler instead (every C++ kernel switched
off by its environment variable: the default is the grouped LoRA kernel and attention by matmuls, the invariant path
their torch twins), written to batch_invariance_torch.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (cpu_times, default_model_dir, machine, make_adapters, round_robin, steal_share,
                               step_timed, warmup, workload_prompts, write_json)
from loraplex import LLM, SamplingParams

MODES = {"today": False, "batch-invariant": True}
SWITCHES = ("LORAPLEX_ATTENTION_KERNEL", "LORAPLEX_LORA_KERNEL", "LORAPLEX_FUSED_OPS")  # "torch": the kernel is off


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--adapters", type=Path, default=None)
    ap.add_argument("--kernels", choices=["native", "torch"], default="native")
    args = ap.parse_args()
    if args.kernels == "torch":
        os.environ.update({name: "torch" for name in SWITCHES})  # read when each kernel is first loaded
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(default_model_dir(), root, 8)
        llms = {mode: LLM(adapter_dir=str(root), max_loras=8, enable_prefix_caching=False, batch_invariant=on)
                for mode, on in MODES.items()}
        prompts = workload_prompts(llms["today"].tokenizer, max(args.batches))
        adapters = list(round_robin(names, max(args.batches)))
        for mode, llm in llms.items():
            step_timed(llm, warmup(prompts[:8]), adapters[:8], 4, f"warm-{mode}")
        # Greedy answers alone, for the equality count (the invariant path must give every request its solo answer).
        solo = {mode: [step_timed(llm, [p], [a], args.max_tokens, f"solo-{mode}-{i}")[3][0]
                       for i, (p, a) in enumerate(zip(prompts, adapters))] for mode, llm in llms.items()}
        runs: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
        before = cpu_times()
        equal: dict[tuple[str, int], int] = {}
        for rep in range(args.reps):
            for b in args.batches:
                for mode, llm in llms.items():
                    prefill, decode, tokens, answers = step_timed(llm, prompts[:b], adapters[:b], args.max_tokens,
                                                           f"{mode}-{b}-{rep}")
                    runs.setdefault((mode, b), []).append((prefill, decode, tokens))
                    equal[(mode, b)] = sum(x == s for x, s in zip(answers, solo[mode][:b]))
        rows: list[dict[str, Any]] = []
        for b in args.batches:
            for mode in MODES:
                measured = runs[(mode, b)]
                rows.append({"mode": mode, "batch": b, "prefill_s": statistics.median(p for p, _, _ in measured),
                             "decode_tokens_per_s": statistics.median(n / d for _, d, n in measured),
                             "equal_to_solo": equal[(mode, b)]})
                r = rows[-1]
                print(f"batch {b:3} {mode:16} prefill {r['prefill_s'] * 1e3:7.1f} ms  decode "
                      f"{r['decode_tokens_per_s']:7.1f} tok/s  solo answers {r['equal_to_solo']}/{b}", flush=True)
            # Each repetition measured the two engines one after the other: their ratio is less exposed to the
            # machine's drift than the ratio of medians.
            paired = [(n1 / d1) / (n0 / d0) for (_, d0, n0), (_, d1, n1) in zip(runs[("today", b)],
                                                                                runs[("batch-invariant", b)])]
            rows[-1]["decode_ratio_paired"] = statistics.median(paired)
            rows[-1]["prefill_ratio_paired"] = statistics.median(
                p1 / p0 for (p0, _, _), (p1, _, _) in zip(runs[("today", b)], runs[("batch-invariant", b)]))
            print(f"batch {b:3} invariant / default, median of paired repetitions: decode "
                  f"{rows[-1]['decode_ratio_paired']:.3f}, prefill time {rows[-1]['prefill_ratio_paired']:.3f}", flush=True)
        detail = llms["batch-invariant"].engine.facts.batch_invariance.detail
        steal = steal_share(before, cpu_times())
    name = "batch_invariance" if args.kernels == "native" else "batch_invariance_torch"
    out = write_json(name, {"machine": machine(), "kernels": args.kernels, "max_tokens": args.max_tokens,
                            "reps": args.reps, "adapters": 8, "invariance": detail, "steal_share": steal, "rows": rows})
    print(f"written to {out}")


if __name__ == "__main__":
    main()
