"""Memory and throughput of the base unquantized (in the dtype resolved here), NF4 (double-quant), int8, the
embedded GGUF's own Q4_1 blocks (--quantization gguf) and, where `auto` resolves to float32 (a CPU without native
bf16), a bf16 copy of the model whose decoder linears stay bf16 (quant/bf16_weights.py), with 8 adapters on top.

    .venv/bin/python -m benchmarks.quantized [--requests 32 --max-tokens 32] [--batches 1 8 32] [--bases nf4 gguf]

Memory is the engine's own accounting (engine/memory.py: tensors as held) plus the decoder linears
alone, and the bytes of weights a decode step reads (the linears and the LM head: at batch 1 they are the step's
traffic, so with the batch-1 rate and this machine's copy bandwidth they give the fraction of it reached); throughput is the offline workload (base only, and 8 adapters round-robin), greedy, EOS ignored:
`--requests` at once through LLM.generate, and decode tokens per second at each of `--batches` (engine steps
timed, decode steps only: benchmarks.common.step_timed), the median of `--reps`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (bf16_copy, default_model_dir, machine, make_adapters, round_robin, step_timed, warmup,
                               workload_prompts, write_json)
from benchmarks.roofline import copy_bandwidth_gbs
from loraplex import LLM, SamplingParams
from loraplex.engine.memory import module_bytes
from loraplex.hardware import resolve_dtype
from loraplex.models.layers import Linear, layer_index
from loraplex.quant.bf16_weights import FORMAT as BF16_WEIGHTS
from loraplex.quant.linear import QuantLinear

CONFIGS: list[tuple[str, str | None, bool]] = [("model dtype", None, False), ("nf4", "nf4", True), ("int8", "int8", False),
                                               ("GGUF Q4_1 as shipped", "gguf", False),
                                               ("bf16 checkpoint, linears kept bf16", BF16_WEIGHTS, False)]


def linear_bytes(llm: LLM) -> int:
    """Bytes of the decoder-layer linears as held (weights incl. their packed copies, or codes + scales)."""
    return sum(module_bytes(m) for name, m in llm.engine.runner.model.named_modules()
               if isinstance(m, (Linear, QuantLinear)) and layer_index(name) is not None)


def step_weight_bytes(llm: LLM) -> int:
    """Bytes of weights one decode step reads: the decoder linears and the LM head as held (the tied head's packed
    copy where it has one; a head on the embeddings' own blocks or bf16 rows reads those)."""
    model = llm.engine.runner.model
    head = module_bytes(model.lm_head) if model.lm_head is not None else model.head_packed.nbytes \
        if model.head_packed is not None else model.embed_tokens.weight.nbytes
    return linear_bytes(llm) + head


def kernels(llm: LLM, method: str | None) -> str:
    """What the quantized linears run at decode: the fused CPU kernels, torch's int8 kernel, or dequantize + GEMM."""
    quant = [m for m in llm.engine.runner.model.modules() if isinstance(m, QuantLinear)]
    if not quant:
        return "dense"
    if quant[0].kernel_parts is not None:
        return "fused"
    return "torch int8" if quant[0]._int8pack(quant[0].dtype, torch.device("cpu")) else "dequantize"


def throughput(llm: LLM, prompts: list[str], adapters: list[str | None], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(warmup(prompts[:4]), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters[:4])  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, adapters)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def decode_rates(llm: LLM, prompts: list[str], names: list[str], batches: list[int], max_tokens: int, reps: int,
                 warm: bool = False) -> dict[str, dict[str, float]]:
    """batch -> {"base": decode tok/s, "8_adapters": decode tok/s}, each the median of `reps` runs; with `warm`, each
    after a short untimed run of the same batch (prompts sharing no prefix with the timed ones)."""
    rates: dict[str, dict[str, float]] = {}
    for b in batches:
        for kind, adapters in (("base", [None] * b), ("8_adapters", list(round_robin(names, b)))):
            if warm:
                step_timed(llm, warmup(prompts[:b]), adapters, 4, f"warm-{kind}-{b}")
            runs = [step_timed(llm, prompts[:b], adapters, max_tokens, f"{kind}-{b}-{i}") for i in range(reps)]
            rates.setdefault(str(b), {})[kind] = statistics.median(n / d for _, d, n, _ in runs)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=Path, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bases", nargs="+", choices=[m for _, m, _ in CONFIGS if m], default=None,
                    help="only these quantized bases (the dense base always runs: the ratios are to it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[dict[str, Any]] = []
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.adapters or Path(tmp)
        names = make_adapters(default_model_dir(), root, 8)
        for label, method, double_quant in CONFIGS:
            if method is not None and args.bases is not None and method not in args.bases:
                continue
            model = None
            if method == BF16_WEIGHTS:  # the dense row's model in bf16; its linears stay bf16 where auto is fp32
                if resolve_dtype("auto").dtype != torch.float32:
                    print(f"{label}: skipped, auto resolves to {resolve_dtype('auto').name} here", flush=True)
                    continue
                model, method = str(bf16_copy(default_model_dir(), Path(tmp) / "bf16-model")), None
            llm = LLM(model=model, adapter_dir=str(root), max_loras=8, quantization=method, double_quant=double_quant,
                      enable_prefix_caching=False)
            prompts = workload_prompts(llm.tokenizer, args.requests)
            mem = llm.engine.facts.memory
            row = {"base": label, "quantization": mem.quantization, "weights_bytes": mem.weights,
                   "linear_bytes": linear_bytes(llm), "step_weight_bytes": step_weight_bytes(llm), "kv_cache_bytes": mem.kv_cache, "adapter_slots_bytes": mem.adapters,
                   "tokens_per_s_base": throughput(llm, prompts, [None] * args.requests, args.max_tokens),
                   "tokens_per_s_8_adapters": throughput(llm, prompts, list(round_robin(names, args.requests)), args.max_tokens),
                   "decode_tokens_per_s": decode_rates(llm, prompts, names, args.batches, args.max_tokens, args.reps),
                   "kernels": kernels(llm, method)}
            rows.append(row)
            print(f"{label}: weights {mem.weights / 2**20:.1f} MiB (decoder linears {row['linear_bytes'] / 2**20:.1f} MiB), "
                  f"base {row['tokens_per_s_base']:.1f} tok/s, 8 adapters {row['tokens_per_s_8_adapters']:.1f} tok/s", flush=True)
            del llm
            gc.collect()
    print(f"written to {write_json('quantized', {'machine': machine(), 'copy_bandwidth_gbs': bandwidth, 'requests': args.requests, 'max_tokens': args.max_tokens, 'batches': args.batches, 'reps': args.reps, 'rows': rows})}")


if __name__ == "__main__":
    main()
