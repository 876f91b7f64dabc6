"""Memory and throughput of the base unquantized (in the dtype resolved here), NF4 (double-quant) and int8, with
8 adapters on top.

    .venv/bin/python -m benchmarks.quantized [--requests 32 --max-tokens 32]

Memory is the engine's own accounting (engine/memory.py: tensors as held) plus the decoder linears
alone; throughput is the offline workload (base only, and 8 adapters round-robin), greedy, EOS ignored.
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
from loraplex.engine.memory import module_bytes
from loraplex.models.layers import Linear, layer_index
from loraplex.quant.linear import QuantLinear

CONFIGS: list[tuple[str, str | None, bool]] = [("model dtype", None, False), ("nf4", "nf4", True), ("int8", "int8", False)]


def linear_bytes(llm: LLM) -> int:
    """Bytes of the decoder-layer linears as held (weights incl. their packed copies, or codes + scales)."""
    return sum(module_bytes(m) for name, m in llm.engine.runner.model.named_modules()
               if isinstance(m, (Linear, QuantLinear)) and layer_index(name) is not None)


def throughput(llm: LLM, prompts: list[str], adapters: list[str | None], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(warmup(prompts[:4]), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters[:4])  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(default_model_dir(), root, 8)
        for label, method, double_quant in CONFIGS:
            llm = LLM(adapter_dir=str(root), max_loras=8, quantization=method, double_quant=double_quant,
                      enable_prefix_caching=False)
            prompts = workload_prompts(llm.tokenizer, args.requests)
            mem = llm.engine.facts.memory
            row = {"base": label, "quantization": mem.quantization, "weights_bytes": mem.weights,
                   "linear_bytes": linear_bytes(llm), "kv_cache_bytes": mem.kv_cache, "adapter_slots_bytes": mem.adapters,
                   "tokens_per_s_base": throughput(llm, prompts, [None] * args.requests, args.max_tokens),
                   "tokens_per_s_8_adapters": throughput(llm, prompts, list(round_robin(names, args.requests)), args.max_tokens)}
            rows.append(row)
            print(f"{label}: weights {mem.weights / 2**20:.1f} MiB (decoder linears {row['linear_bytes'] / 2**20:.1f} MiB), "
                  f"base {row['tokens_per_s_base']:.1f} tok/s, 8 adapters {row['tokens_per_s_8_adapters']:.1f} tok/s", flush=True)
            del llm
            gc.collect()
    print(f"written to {write_json('quantized', {'machine': machine(), 'requests': args.requests, 'max_tokens': args.max_tokens, 'rows': rows})}")


if __name__ == "__main__":
    main()
