"""The decoder's small per-layer ops in one C++ call each on CPU (csrc/fused_cpu.cpp): residual add + RMSNorm,
rotary embeddings of q and k, silu(gate) * up. Built once per machine (loraplex.native), called through ctypes.

The references are the torch code the model runs without them (RMSNorm.reference, RotaryEmbedding.reference,
LlamaMLP's silu * up), with the same roundings in bf16; tests/test_cpu_fused.py holds the two equal. Without a
compiler, or with LORAPLEX_FUSED_OPS=torch, that torch code serves.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from loraplex import native

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # loaded after torch: its OpenMP is torch's (same soname)
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.loraplex_add_rmsnorm.argtypes = [c_int, p, p, p, ctypes.c_float, p, i64, i64, c_int, c_int]
    lib.loraplex_rope.argtypes = [c_int, p, i64, i64, i64, i64, i64, p, p, p, p, p, c_int]
    lib.loraplex_silu_mul.argtypes = [c_int, p, p, i64, i64, c_int]
    for fn in (lib.loraplex_add_rmsnorm, lib.loraplex_rope, lib.loraplex_silu_mul):
        fn.restype = c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    return native.load_or_none(SOURCE, load, "the fused norm/rope/activation kernels", "torch's ops",
                               "LORAPLEX_FUSED_OPS")


def supported(x: torch.Tensor) -> bool:
    """The fused ops run on `x` (CPU, float32 or bfloat16) where the library is built."""
    return x.device.type == "cpu" and x.dtype in DTYPES and library() is not None


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"fused CPU op {what}")


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, add: bool,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """With add: residual += x (in place, rounded to the dtype), then RMSNorm(residual); without: RMSNorm(residual).
    x, residual: [T, D] contiguous, one dtype; weight: [D]. Returns the normalised [T, D]."""
    lib = lib or library()
    assert lib is not None
    t, d = residual.shape
    _check(residual.is_contiguous() and x.is_contiguous() and x.shape == residual.shape and weight.shape == (d,)
           and x.dtype == residual.dtype == weight.dtype and x.dtype in DTYPES,
           f"add_rmsnorm: x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty_like(residual)
    lib.loraplex_add_rmsnorm(DTYPES[x.dtype], x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps,
                             out.data_ptr(), t, d, int(add), torch.get_num_threads())
    return out


def rope(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k, rotated, from the packed qkv [T, (H + 2*KVH) * D] (rows may be strided, columns contiguous):
    q [T, H, D], k [T, KVH, D], contiguous. positions: [T] long; cos, sin: [P, D] tables in qkv's dtype."""
    lib = lib or library()
    assert lib is not None
    t = qkv.shape[0]
    _check(qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] >= (heads + 2 * kv_heads) * head_dim
           and qkv.dtype in DTYPES and positions.dtype == torch.int64 and positions.is_contiguous()
           and positions.shape == (t,) and cos.dtype == sin.dtype == qkv.dtype and cos.is_contiguous()
           and sin.is_contiguous() and cos.shape[1] == head_dim and head_dim % 2 == 0,
           f"rope: qkv {tuple(qkv.shape)} {qkv.dtype} stride {qkv.stride()}, heads {heads}/{kv_heads}x{head_dim}, "
           f"positions {tuple(positions.shape)} {positions.dtype}, tables {tuple(cos.shape)} {cos.dtype}")
    q = torch.empty(t, heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(t, kv_heads, head_dim, dtype=qkv.dtype)
    lib.loraplex_rope(DTYPES[qkv.dtype], qkv.data_ptr(), qkv.stride(0), t, heads, kv_heads, head_dim,
                      positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(),
                      torch.get_num_threads())
    return q, k


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2*I] = (gate, up) side by side -> [T, I]."""
    lib = lib or library()
    assert lib is not None
    t, w = gate_up.shape
    _check(gate_up.is_contiguous() and w % 2 == 0 and gate_up.dtype in DTYPES,
           f"silu_mul: gate_up {tuple(gate_up.shape)} {gate_up.dtype}")
    out = torch.empty(t, w // 2, dtype=gate_up.dtype)
    lib.loraplex_silu_mul(DTYPES[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), t, w // 2,
                          torch.get_num_threads())
    return out
