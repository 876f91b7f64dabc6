"""The fused multi-LoRA CPU kernel (csrc/lora_cpu.cpp): compiled once per machine, called through ctypes.

The source uses no torch headers, so the build is one compiler call of about a second, made on first use
(and by `make setup`), cached under ~/.cache/loraplex (LORAPLEX_CACHE) by a hash of the source, the flags,
the compiler and the CPU's feature flags: a cached build never runs on a CPU it was not made for.
Without a C++ compiler, or with LORAPLEX_LORA_KERNEL=torch, the torch kernels in ops.py serve instead.
The reference is ops.lora_reference; tests/test_lora_cpu_kernel.py holds the two equal.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))
    return root / "kernels" / f"lora_cpu-{key}.so"


def build(cxx: str) -> Path:
    """Compile the kernel unless this machine's build is cached; return the library's path."""
    path = library_path(cxx)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # concurrent builders each write their own
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (the torch kernels serve) with the reason logged once."""
    if os.environ.get("LORAPLEX_LORA_KERNEL", "").lower() == "torch":
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler found: multi-LoRA runs on the torch kernels (slower on CPU)")
        return None
    try:
        lib = ctypes.CDLL(str(build(cxx)))  # loaded after torch: its OpenMP is torch's (same soname)
    except (OSError, RuntimeError) as e:
        log.warning("fused LoRA kernel unavailable, using the torch kernels: %s", e)
        return None
    fn = lib.loraplex_lora_add
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ctypes.c_int, p, i64, p, p, i64, i64, p, p, i64, p, i64, i64, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and dtype in DTYPES and library() is not None


def compact_b(b: torch.Tensor, offsets: list[int], max_rank: int) -> torch.Tensor:
    """[S, P*max_rank, OUT] block-diagonal B (the torch kernels' layout) -> [S, max_rank*OUT], the fused
    kernel's: part p's block b[:, p*max_rank:(p+1)*max_rank, offsets[p]:offsets[p+1]] at max_rank*offsets[p]."""
    blocks = [b[:, p * max_rank:(p + 1) * max_rank, lo:hi].reshape(b.shape[0], -1)
              for p, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:]))]
    return torch.cat(blocks, dim=1).contiguous()


def lora_add(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, groups: torch.Tensor,
             ranks: torch.Tensor, part_offsets: torch.Tensor, max_rank: int, out: torch.Tensor) -> torch.Tensor:
    """out[t] += (x[t] @ A[s]^T) @ B[s] for the tokens of each group; see csrc/lora_cpu.cpp for the layout.

    x: [T, IN]  a: [S, R, IN]  b: [S, max_rank*OUT] (compact_b's layout)  order: [N] long  groups: [G, 3] long (slot, start, count)
    ranks: [S, P] int32  part_offsets: [P+1] long  out: [T, OUT], all contiguous, on the CPU, one dtype."""
    lib = library()
    assert lib is not None and x.is_contiguous() and out.is_contiguous() and x.dtype == out.dtype == a.dtype
    rc = lib.loraplex_lora_add(
        DTYPES[x.dtype], x.data_ptr(), x.shape[-1], a.data_ptr(), b.data_ptr(), a.shape[1], out.shape[1],
        order.data_ptr(), groups.data_ptr(), groups.shape[0], ranks.data_ptr(), ranks.shape[1], max_rank,
        part_offsets.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"fused LoRA kernel: unsupported dtype {x.dtype}")
    return out


def main() -> None:
    """Build now and say whether the kernel is ready (make setup runs this, so the first request does not)."""
    logging.basicConfig(level=logging.INFO)
    print(f"fused LoRA CPU kernel: {'ready' if library() is not None else 'unavailable, the torch kernels serve'}")
