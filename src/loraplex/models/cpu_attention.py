"""Paged decode attention on CPU (csrc/attention_cpu.cpp): built once per machine (loraplex.native), called
through ctypes. Reads each sequence's keys and values in place from the paged cache, with no gathered or
transposed copies. Without a C++ compiler, or with LORAPLEX_ATTENTION_KERNEL=torch, the torch path in
attention.py serves. The reference is that torch path; tests/test_cpu_attention.py holds the two equal.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from loraplex import native

SOURCE = Path(__file__).with_name("csrc") / "attention_cpu.cpp"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes
GROUPS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)  # query heads per KV head, as dispatched in the source


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # loaded after torch: its OpenMP is torch's (same soname)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.loraplex_paged_decode.argtypes = [ctypes.c_int, p, p, p, p, i64, p, i64, i64, i64, i64, i64, i64,
                                          ctypes.c_float, p, ctypes.c_int]
    lib.loraplex_paged_decode.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the torch path serves) with the reason logged once."""
    return native.load_or_none(SOURCE, load, "the paged attention kernel", "torch's matmuls",
                               "LORAPLEX_ATTENTION_KERNEL")


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and dtype in DTYPES and library() is not None


def handles(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The head groupings and sizes the kernel is built for (csrc/attention_cpu.cpp's dispatch)."""
    return num_kv_heads > 0 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads in GROUPS \
        and head_dim <= 256


def serves(dtype: torch.dtype, device: torch.device | str, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The kernel attends a layer of these heads in `dtype` on `device` (else the torch path does)."""
    return supported(dtype, device) and handles(num_heads, num_kv_heads, head_dim)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, window: int | None, scale: float,
                 out: torch.Tensor) -> None:
    """out[b] = softmax(q[b] K_b^T * scale) V_b over the keys at positions [max(0, ctx-window), ctx) of sequence b.

    q, out: [B, H, D]  k_cache, v_cache: [S, KVH, D]  block_tables: [B, NB] long  context_lens: [B] long;
    all contiguous on the CPU, q/out/caches in one dtype, and head shapes the kernel `handles`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the paged attention kernel is not built (cpu_attention.library() is None)")
    call(lib, q, k_cache, v_cache, block_tables, context_lens, block_size, window, scale, out)


def call(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
         context_lens: torch.Tensor, block_size: int, window: int | None, scale: float, out: torch.Tensor) -> None:
    """paged_decode through a given build of the kernel. The checks stand between Python and raw pointers."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    ok = (q.dtype in DTYPES and q.dtype == k_cache.dtype == v_cache.dtype == out.dtype
          and q.is_contiguous() and out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
          and block_tables.is_contiguous() and context_lens.is_contiguous()
          and block_tables.dtype == context_lens.dtype == torch.int64 and tuple(out.shape) == (b, h, d)
          and k_cache.shape == v_cache.shape and k_cache.shape[2] == d and block_tables.shape[0] == b
          and context_lens.shape == (b,))
    if not ok:  # one boolean on the hot path; the message is built only when it fails
        raise ValueError("paged decode attention: q/out [B, H, D], caches [S, KVH, D] contiguous on the CPU in one "
                         f"dtype (float32/bfloat16), tables/lengths int64; got q {tuple(q.shape)} {q.dtype}, cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}, out {tuple(out.shape)} {out.dtype}, tables "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}, lengths {tuple(context_lens.shape)}")
    rc = lib.loraplex_paged_decode(
        DTYPES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), b, h, kvh, d, block_size, window or 0, scale,
        out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"paged decode attention: {h} heads over {kvh} KV heads of size {d} are not handled "
                         "(cpu_attention.handles)")
