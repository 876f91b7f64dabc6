"""Issue 41's first measure: does a row of the engine's base linears get the bits it gets alone, whatever else shares
the call? For each linear shape the engine runs (the default model's fused qkv, o, gate_up and down, and the LM
head), in fp32 and bf16, through the oneDNN prepacked path the engine uses (models/cpu_gemm.py) and through
F.linear (the reference), 64 random rows are computed alone, one call each, then in batches of M rows; the figure is
how many of the M rows differ by any bit. The `tiled` path is the candidate fix: the prepacked linear called on
tiles of at most --tile rows, a 1-row call padded to 2; `prefill_ms` is each path's time for 512 rows.

    .venv/bin/python -m benchmarks.linear_invariance [--rows 1 2 8 16 32 33 48 64] [--tile 32]

A correctness probe, not a speed figure; the kernel oneDNN or MKL picks depends on the CPU class, so run it per class
(docs/benchmarks/<class>/linear_invariance.json).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import default_model_dir, machine, write_json
from loraplex.models import cpu_gemm
from loraplex.models.config import load_model_config


def shapes() -> dict[str, tuple[int, int]]:
    """The engine's linears as it calls them (name -> in, out): q, k and v fused, gate and up fused."""
    cfg = load_model_config(default_model_dir())
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h),
            "lm_head": (h, cfg.vocab_size)}


def differing_rows(run: Any, x: torch.Tensor, rows: list[int]) -> dict[int, int]:
    """For each M in `rows`: how many of the first M rows, computed in one call, differ from the row alone."""
    alone = torch.cat([run(x[j:j + 1]) for j in range(x.shape[0])])
    return {m: int((run(x[:m]) != alone[:m]).any(dim=1).sum()) for m in rows}


Run = Callable[[torch.Tensor], torch.Tensor]


def tiled(run: Run, tile: int) -> Run:
    """`run` on tiles of at most `tile` rows, a 1-row tile padded to 2 rows (the pad's output dropped)."""
    def call(x: torch.Tensor) -> torch.Tensor:
        parts = [x[i:i + tile] for i in range(0, x.shape[0], tile)]
        return torch.cat([run(torch.cat([t, t]))[:1] if t.shape[0] == 1 else run(t) for t in parts])
    return call


def prefill_ms(run: Run, in_f: int, dtype: torch.dtype, rows: int = 512, reps: int = 5) -> float:
    x = torch.randn(rows, in_f).to(dtype)
    run(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        run(x)
    return (time.perf_counter() - t0) / reps * 1e3


def probe(rows: list[int], tile: int) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (in_f, out_f) in shapes().items():
            w = (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype)
            x = torch.randn(max(rows), in_f).to(dtype)
            paths: dict[str, Run] = {"F.linear": lambda t, w=w: F.linear(t, w)}
            if cpu_gemm.supported(w):
                packed = cpu_gemm.pack(w)
                paths["packed"] = lambda t, p=packed: cpu_gemm.linear(t, p, None)
                paths["tiled"] = tiled(paths["packed"], tile)
            for path, run in paths.items():
                found = differing_rows(run, x, rows)
                ms = prefill_ms(run, in_f, dtype)
                out[f"{str(dtype).removeprefix('torch.')} {name} {path}"] = {"differing_rows": found, "prefill_ms": ms}
                print(f"{str(dtype).removeprefix('torch.'):9} {name:13} {in_f:5}->{out_f:6} {path:9} rows differing "
                      f"from alone: " + " ".join(f"M={m}:{n}" for m, n in found.items()) + f"; 512 rows {ms:.1f} ms",
                      flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16, 32, 33, 48, 64])
    ap.add_argument("--tile", type=int, default=32, help="the tiled path's rows per call")
    args = ap.parse_args()
    write_json("linear_invariance", {"machine": machine(), "rows": args.rows, "tile": args.tile,
                                     "paths": probe(args.rows, args.tile)})


if __name__ == "__main__":
    main()
