"""A long-running server's memory stays bounded by the shapes it sees: the oneDNN kernel caches are capped
(allocator.bound_kernel_caches) and freed heap pages go back to the system (allocator.HeapTrimmer)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraplex.allocator import KERNEL_CACHE_CAPACITY, HeapTrimmer, bound_kernel_caches
from loraplex.models import cpu_gemm

# In a fresh process (the caches read their capacity once): 300 new row counts through 4 prepacked fp32 linears of
# the default model's shapes. Unbounded, the caches keep all 1,200 kernels (~0.45 MiB each, > 400 MiB); bounded,
# at most 2 x 64 of them.
_PROBE = """
import ctypes, sys, torch
from loraplex.allocator import bound_kernel_caches
from loraplex.models import cpu_gemm
if sys.argv[1] == "bounded":
    bound_kernel_caches()
torch.set_num_threads(1)
shapes = [(576, 576), (192, 576), (3072, 576), (576, 1536)]
packed = [(cpu_gemm.pack(torch.randn(o, i)), torch.randn(320, i)) for o, i in shapes]
trim = ctypes.CDLL("libc.so.6").malloc_trim
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
for w, x in packed:
    cpu_gemm.linear(x[:8], w, None)
trim(0); before = rss()
for rows in range(9, 309):
    for w, x in packed:
        cpu_gemm.linear(x[:rows], w, None)
trim(0); print((rss() - before) / 2**20)
"""


def _growth_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**env, "OMP_NUM_THREADS": "1"})  # the CPU-class variables (ONEDNN_MAX_CPU_ISA) pass
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (sys.platform == "linux" and cpu_gemm.available(__import__("torch").float32)),
                    reason="needs oneDNN's prepacked linear and /proc (Linux)")
@pytest.mark.slow
def test_kernel_caches_are_bounded_with_new_row_counts() -> None:
    bounded, unbounded = _growth_mib("bounded"), _growth_mib("default")
    assert bounded < 100, f"RSS grew {bounded:.0f} MiB over 300 new row counts with the caches bounded"
    assert unbounded > 2 * bounded, (bounded, unbounded)  # the probe sees what the bound removes


def test_bound_keeps_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert bound_kernel_caches() == {"LRU_CACHE_CAPACITY": str(KERNEL_CACHE_CAPACITY),
                                     "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
    with pytest.raises(ValueError, match="capacity"):
        bound_kernel_caches(0)


def test_heap_trimmer_trims_at_most_every_interval() -> None:
    trimmer = HeapTrimmer(every_s=3600)
    trimmer.maybe_trim()
    assert trimmer.trims == 0
    trimmer.every_s = 0.0
    trimmer.maybe_trim()
    assert trimmer.trims == (0 if trimmer._trim is None else 1)
