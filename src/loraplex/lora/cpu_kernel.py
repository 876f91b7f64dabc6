"""The fused multi-LoRA CPU kernel (csrc/lora_cpu.cpp): compiled once per machine (loraplex.native), called
through ctypes. Without a C++ compiler, or with LORAPLEX_LORA_KERNEL=torch, the torch kernels in ops.py serve.
The reference is ops.lora_reference; tests/test_lora_cpu_kernel.py holds the two equal.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from loraplex import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # loaded after torch: its OpenMP is torch's (same soname)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.loraplex_lora_add.argtypes = [ctypes.c_int, p, i64, p, p, i64, i64, p, p, i64, p, i64, i64, p, p, ctypes.c_int]
    lib.loraplex_lora_add.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the torch kernels serve) with the reason logged once."""
    return native.load_or_none(SOURCE, load, "the fused LoRA kernel", "the torch LoRA kernels", "LORAPLEX_LORA_KERNEL")


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and dtype in DTYPES and library() is not None


def lora_add(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, groups: torch.Tensor,
             ranks: torch.Tensor, part_offsets: torch.Tensor, max_rank: int, out: torch.Tensor) -> torch.Tensor:
    """out[t] += (x[t] @ A[s]^T) @ B[s] for the tokens of each group; see csrc/lora_cpu.cpp for the layout.

    x: [T, IN]  a: [S, R, IN]  b: [S, max_rank*OUT] (compact: lora/slot_layout.py)  order: [N] long  groups: [G, 3] long (slot, start, count)
    ranks: [S, P] int32  part_offsets: [P+1] long  out: [T, OUT], all contiguous, on the CPU, one dtype."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused LoRA kernel is not built (cpu_kernel.library() is None)")
    return call(lib, x, a, b, order, groups, ranks, part_offsets, max_rank, out)


def call(lib: ctypes.CDLL, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor,
         groups: torch.Tensor, ranks: torch.Tensor, part_offsets: torch.Tensor, max_rank: int,
         out: torch.Tensor) -> torch.Tensor:
    """lora_add through a given build of the kernel. The checks stand between Python and raw pointers."""
    t, in_f = x.shape
    s, r_total = a.shape[0], a.shape[1]
    out_f = out.shape[1]
    ok = (x.dtype in DTYPES and x.dtype == a.dtype == b.dtype == out.dtype
          and order.dtype == groups.dtype == part_offsets.dtype == torch.int64 and ranks.dtype == torch.int32
          and x.is_contiguous() and out.is_contiguous() and a.is_contiguous() and b.is_contiguous()
          and order.is_contiguous() and groups.is_contiguous() and ranks.is_contiguous()
          and a.dim() == 3 and a.shape[2] == in_f and out.shape[0] == t and tuple(b.shape) == (s, max_rank * out_f)
          and tuple(ranks.shape) == (s, part_offsets.shape[0] - 1) and r_total == ranks.shape[1] * max_rank
          and groups.dim() == 2 and groups.shape[1] == 3 and x.device.type == "cpu")
    if not ok:  # one boolean on the hot path; the message is built only when it fails
        raise ValueError("fused LoRA kernel: x [T, IN], A [S, P*max_rank, IN], B [S, max_rank*OUT], out [T, OUT] "
                         "contiguous on the CPU in one dtype (float32/bfloat16), order/groups/offsets int64, "
                         f"ranks [S, P] int32; got x {tuple(x.shape)} {x.dtype}, A {tuple(a.shape)} {a.dtype}, "
                         f"B {tuple(b.shape)} {b.dtype}, out {tuple(out.shape)} {out.dtype}, ranks "
                         f"{tuple(ranks.shape)} {ranks.dtype}, offsets {tuple(part_offsets.shape)}, max_rank {max_rank}")
    rc = lib.loraplex_lora_add(
        DTYPES[x.dtype], x.data_ptr(), in_f, a.data_ptr(), b.data_ptr(), r_total, out_f,
        order.data_ptr(), groups.data_ptr(), groups.shape[0], ranks.data_ptr(), ranks.shape[1], max_rank,
        part_offsets.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"fused LoRA kernel: unsupported dtype {x.dtype}")
    return out
