"""Profile of the multi-LoRA kernels and the per-step mapping cost, at the default model's shapes.

    .venv/bin/python -m benchmarks.lora_kernels

For each layer shape (packed q/k/v, o) and batch (decode T tokens, prefill chunks), times the fused C++
kernel and the torch fallback (grouped, SGMV-style) for 1..32 distinct adapters against the base layer's
own matmul, and the time to build the step's adapter mapping for a batch of 64. This is the profile
behind the kernel choice in `loraplex.lora.mapping`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import machine, write_json
from loraplex.hardware import resolve_dtype
from loraplex.lora import cpu_kernel
from loraplex.models import cpu_gemm
from loraplex.lora.mapping import build_mapping
from loraplex.lora.ops import lora_fused, lora_grouped
from loraplex.lora.slot_layout import SlotLayout, SlotShape

# (name, IN, part widths, rank): the default model (hidden 576, 9 heads of 64, 3 KV heads), rank 16 q/k/v/o.
SHAPES = [("qkv_proj", 576, (576, 192, 192), 16), ("o_proj", 576, (576,), 16)]
ADAPTERS = [1, 2, 3, 4, 8, 16, 32]


def timeit(f: Callable[[], Any], repeats: int = 5, min_s: float = 0.04) -> float:
    """Seconds per call: the fastest of `repeats` timed loops, so a busy neighbour does not skew the profile."""
    for _ in range(5):
        f()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s:
            f()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def token_slots(t: int, k: int) -> list[int]:
    return [i % k for i in range(t)]


def kernel_profile(tokens: list[int], dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, fin, parts, rank in SHAPES:
        fout, r = sum(parts), len(parts) * rank
        a = torch.randn(32, r, fin, generator=g).to(dtype) * 0.02
        b = torch.randn(32, r, fout, generator=g).to(dtype) * 0.02
        w = torch.randn(fout, fin, generator=g).to(dtype)
        packed = cpu_gemm.pack(w) if cpu_gemm.supported(w) else None  # the base GEMM as the engine runs it
        layout = SlotLayout.on(SlotShape(parts, fin, rank, compact=True), 32, "cpu",
                               torch.full((32, len(parts)), rank, dtype=torch.int32))
        b_compact = layout.shape.to_compact(b)
        for t in tokens:
            x = torch.randn(t, fin, generator=g).to(dtype)
            base = timeit(lambda: cpu_gemm.linear(x, packed, None) if packed is not None
                          else torch.nn.functional.linear(x, w))
            for k in ADAPTERS:
                if k > t:
                    continue
                slots = token_slots(t, k)
                row = {"layer": name, "tokens": t, "adapters": k, "base_us": 1e6 * base}
                m = build_mapping(slots, dtype, kernel="grouped")
                assert m is not None
                row["grouped_us"] = 1e6 * timeit(lambda: lora_grouped(x, a, b, m))
                if cpu_kernel.supported(dtype, x.device):
                    m = build_mapping(slots, dtype, kernel="fused")
                    row["fused_us"] = 1e6 * timeit(lambda: lora_fused(x, a, b_compact, m, layout))  # type: ignore[arg-type]
                rows.append(row)
                fused = f"  fused {row['fused_us']:7.1f} us" if "fused_us" in row else ""
                print(f"{name:8s} T={t:4d} adapters={k:2d}  base {row['base_us']:7.1f} us  "
                      f"grouped {row['grouped_us']:7.1f} us{fused}", flush=True)
    return rows


def mapping_cost(batch: int, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds to build one step's mapping for `batch` decode tokens, by distinct adapters."""
    out = {}
    for k in (1, 8, 32, 64):
        out[str(k)] = 1e6 * timeit(lambda: build_mapping(token_slots(batch, k), dtype))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 64, 256])
    ap.add_argument("--dtype", default="auto", help="auto: what the engine resolves on this machine")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype).dtype
    rows = kernel_profile(args.tokens, dtype)
    cost = mapping_cost(64, dtype)
    print("mapping build for a batch of 64 decode tokens (us, by distinct adapters):", {k: round(v, 1) for k, v in cost.items()})
    path = write_json("lora_kernels", {"machine": machine(), "dtype": str(dtype), "kernels": rows, "mapping_us_batch64": cost})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
