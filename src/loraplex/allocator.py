"""Keep a long-running server's resident memory from growing with the shapes it has seen.

glibc serves allocations above its mmap threshold with mmap, but raises the threshold to the size of each mmapped
block that is freed (up to 32 MiB). Blocks of a size seen before then come from the heap, and a server that sees
ever new prompt lengths and batch sizes leaves more and more freed, fragmented heap pages resident. Trimming
(malloc_trim) returns them and lets RSS level off; holding the threshold fixed instead (mallopt) bounds it less
and costs decode throughput, since every large temporary is then mapped and unmapped (benchmarks/soak.py watches
RSS over a long run). So the engine thread returns freed heap pages to the system at most every TRIM_EVERY_S.

The oneDNN kernels behind the prepacked linears (models/cpu_gemm.py) are compiled per input shape and kept in two
caches: PyTorch's ideep layer (LRU_CACHE_CAPACITY) and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY), 1,024
entries each by default, about 0.45 MiB of code and descriptors per shape. Each new row count a step brings
(batch size, chunked-prefill length) adds entries until both are full: on the default model that was a few hundred
MiB, and the soak's RSS growth under chaos (profiled with memray: all of it in these two caches). One step needs
about a dozen entries (one per distinct linear shape; the layers share them), so 64 each keeps every step's kernels
cached, at the same throughput, and bounds the two caches at ~60 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0
KERNEL_CACHE_CAPACITY = 64  # oneDNN kernels per cache (see above); 0 crashes PyTorch's ideep layer
_KERNEL_CACHE_VARS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Bound the oneDNN kernel caches unless the environment already sets them. The libraries read the variables
    when they first create a kernel, so this must run before the process's first oneDNN linear (the engine calls it
    before it loads the model). Returns the values in force."""
    if capacity < 1:
        raise ValueError(f"kernel cache capacity must be >= 1, got {capacity}")
    return {var: os.environ.setdefault(var, str(capacity)) for var in _KERNEL_CACHE_VARS}


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError, TypeError):
        return None


class HeapTrimmer:
    """Call `maybe_trim()` between engine steps: it trims at most every `every_s` seconds (a trim of a few-GiB heap
    takes milliseconds, a step tens of them)."""

    def __init__(self, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self._trim = _malloc_trim()
        self._last = time.monotonic()
        self.trims = 0

    def maybe_trim(self) -> None:
        if self._trim is None or time.monotonic() - self._last < self.every_s:
            return
        self._trim(0)
        self._last = time.monotonic()
        self.trims += 1
