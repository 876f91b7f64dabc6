"""Roofline: achieved decode GFLOP/s and weight bandwidth against this machine's measured peaks.

    .venv/bin/python -m benchmarks.roofline [--batches 32 64 128] [--adapters 8]

Peaks, in the dtype the engine resolves here (bf16 or fp32): the best of a few large GEMMs (2048^3) through
both of torch's CPU GEMM libraries (MKL's matmul and oneDNN's prepacked linear, the engine's), and a large copy
(GB/s moved). Achieved: the
engine's decode steps alone (prefill finished, every sequence decoding), FLOPs counted from the model
shape (2 per multiply-add in every linear layer, the LM head and attention over the current context),
bytes as the weights every step reads once (in that dtype) plus the KV cache it attends over.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import default_model_dir, machine, make_adapters, round_robin, workload_prompts, write_json
from loraplex import LLM, SamplingParams
from loraplex.hardware import resolve_dtype
from loraplex.models.config import ModelConfig


def gemm_peak_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    """The best GFLOP/s of an n^3 GEMM by MKL (a @ b) or oneDNN's prepacked linear, whichever is faster here."""
    from loraplex.models import cpu_gemm

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    calls = [lambda: a @ b]
    if cpu_gemm.available(dtype):
        packed = cpu_gemm.pack(b)
        calls.append(lambda: cpu_gemm.linear(a, packed, None))
    best = float("inf")
    for call in calls:
        call()
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def copy_bandwidth_gbs(mib: int = 512) -> float:
    src = torch.empty(mib * 2**20 // 2, dtype=torch.bfloat16).normal_()  # bytes moved: the dtype does not matter
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 2 / best / 1e9  # read + write


def linear_params(c: ModelConfig) -> tuple[int, int]:
    """(multiply-adds per token in the decoder layers' linears, in the LM head)."""
    return c.num_layers * sum(i * o for i, o in c.linear_parts().values()), c.hidden_size * c.vocab_size


def lora_bytes_per_adapter(c: ModelConfig, size: int, rank: int = 16) -> int:
    """Bytes of one rank-`rank` q,k,v,o adapter that a decode step reads: A and B of each part (`size` bytes per
    element), as the fused CPU kernel reads them (B compact, no zero blocks of the packed q/k/v layer)."""
    parts = c.linear_parts()
    return size * c.num_layers * sum(rank * (parts[p][0] + parts[p][1]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


def gemm_ms(llm: LLM, batch: int) -> float:
    """Milliseconds one decode step spends in the base model's GEMMs alone: every linear layer and the LM
    head run once on [batch, in] activations, outside the model (caches warm, as in a step)."""
    from loraplex.lora.layers import LoRALinear
    from loraplex.models import cpu_gemm
    from loraplex.models.layers import Linear

    model = llm.engine.runner.model
    layers = [m.base if isinstance(m, LoRALinear) else m for m in model.modules() if isinstance(m, (Linear, LoRALinear))]
    layers = list(dict.fromkeys(l for l in layers if isinstance(l, Linear)))
    xs = [torch.randn(batch, l.in_features).to(llm.engine.runner.dtype) for l in layers]
    h = torch.randn(batch, model.embed_tokens.weight.shape[1]).to(llm.engine.runner.dtype)

    def head() -> torch.Tensor:
        if model.head_packed is not None:
            return cpu_gemm.linear(h, model.head_packed, None)
        return model.lm_head(h) if model.lm_head is not None else torch.nn.functional.linear(h, model.embed_tokens.weight)

    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for l, x in zip(layers, xs):
            l(x)
        head()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def decode_steps(llm: LLM, batch: int, adapters: list[str | None], steps: int) -> tuple[float, float]:
    """Seconds per pure-decode step and the mean context length attended during them."""
    engine = llm.engine
    prompts = workload_prompts(llm.tokenizer, batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        engine.add_request(p, params, a)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    engine.step()  # first decode step, warm
    ctx0 = sum(r.num_computed_tokens for r in engine.scheduler.running) / batch
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = (time.perf_counter() - t0) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, ctx0 + steps / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    choice = resolve_dtype()
    size = torch.finfo(choice.dtype).bits // 8
    peak, bandwidth = gemm_peak_gflops(choice.dtype), copy_bandwidth_gbs()
    print(f"measured peaks: {choice.name} GEMM {peak:.0f} GFLOP/s, copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(default_model_dir(), Path(tmp), args.adapters)
        llm = LLM(adapter_dir=tmp, max_loras=args.adapters, max_num_seqs=max(args.batches),
                  max_num_batched_tokens=2048)
        c = llm.engine.model_config
        layer_macs, head_macs = linear_params(c)
        weight_bytes = size * (layer_macs + head_macs)
        for k in (0, args.adapters):
            for batch in args.batches:
                adapters: list[str | None] = [None] * batch if k == 0 else list(round_robin(names, batch))
                sec, ctx = decode_steps(llm, batch, adapters, args.steps)
                attn_macs = 2 * c.num_layers * c.num_heads * c.head_dim * ctx  # q.k and p.v over the context
                flops = 2 * batch * (layer_macs + head_macs + attn_macs)
                kv_bytes = batch * ctx * c.num_layers * 2 * c.num_kv_heads * c.head_dim * size
                gflops = flops / sec / 1e9
                gbs = (weight_bytes + kv_bytes) / sec / 1e9
                rows.append({"adapters": k, "batch": batch, "step_ms": 1e3 * sec, "gemm_ms": gemm_ms(llm, batch),
                             "tokens_per_s": batch / sec,
                             "context": ctx, "gflops": gflops, "fraction_of_peak": gflops / peak,
                             "gb_per_s": gbs, "fraction_of_bandwidth": gbs / bandwidth})
                print(f"decode, {'base' if k == 0 else f'{k} adapters'}, batch {batch}: {1e3 * sec:.1f} ms/step, "
                      f"{batch / sec:.0f} tok/s, {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f}% of peak, "
                      f"{gbs:.1f} GB/s = {100 * gbs / bandwidth:.0f}% of copy bandwidth; base GEMMs alone "
                      f"{rows[-1]['gemm_ms']:.1f} ms", flush=True)
    result = {"machine": machine(), "dtype": choice.name, "peak_gflops": peak, "copy_bandwidth_gbs": bandwidth,
              "decode": rows, "base_weight_bytes": weight_bytes, "lora_bytes_per_adapter": lora_bytes_per_adapter(c, size)}
    print(f"written to {write_json('roofline', result)}")


if __name__ == "__main__":
    main()
