"""Row tiles: a linear's calls cut so that each row's bits follow from that row alone (batch invariance, issue 41).

GEMM libraries (oneDNN, MKL) pick their kernel, and with it the order of each row's sum over IN, by the shape of the
call, M rows included. So a row's bits can depend on how many rows share its call (bf16 on AMX: from M = 33; fp32
down_proj: M = 1 against M >= 2). `tiled(x, call, tiling)` calls the kernel on tiles of at most `tiling.rows` rows,
a 1-row tile padded to 2 where the 1-row kernel sums in another order, and `invariant_tiling` finds both at start,
for each kernel, weight shape, dtype and thread count on this CPU: the largest T for which every row of every M in
2..T gets the bits it gets in a 2-row call, and whether a 1-row call does too. The engine then only ever makes calls
whose shapes were probed. Any row-wise linear can be tiled: oneDNN's packed GEMM (cpu_gemm), F.linear on a plain or
a dequantized weight, torch's int8 weight-only kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_TILE = 64  # the most rows per call the invariance probe tries (and a batch-invariant call makes)

Rows = Callable[[torch.Tensor], torch.Tensor]  # the linear on rows: [M, IN] -> [M, OUT]


@dataclass(frozen=True, slots=True)
class Tiling:
    """How one linear's calls are cut so that each row's bits follow from that row alone."""
    rows: int  # the most rows per call
    pad_single: bool  # a lone row is called as two (itself twice): its 1-row kernel sums in another order


# A kernel that sums each row in an order fixed by the layer's shape alone (the fused 4-bit kernel): batch-invariant
# by construction, so its calls are never cut.
WHOLE = Tiling(2**62, False)


def tiled(x: torch.Tensor, call: Rows, tiling: Tiling) -> torch.Tensor:
    """x: [..., IN] -> [..., OUT], = call(x), in calls of at most `tiling.rows` rows (a lone row as two where
    `tiling.pad_single`)."""
    rows = x.reshape(-1, x.shape[-1])
    n, size, pad = rows.shape[0], tiling.rows, tiling.pad_single
    if n <= size and (n > 1 or not pad):
        return call(x)
    parts = [rows[i:i + size] for i in range(0, n, size)]
    out = torch.cat([call(p.expand(2, -1))[:1] if pad and p.shape[0] == 1 else call(p) for p in parts])
    return out.view(*x.shape[:-1], out.shape[-1])


_tilings: dict[tuple[str, int, int, torch.dtype, int], Tiling] = {}  # (kernel, OUT, IN, dtype, threads) -> tiling


def invariant_tiling(call: Rows, kernel: str, out_features: int, in_features: int, dtype: torch.dtype) -> Tiling:
    """The largest T <= MAX_TILE such that, for every M in 2..T, each of M rows in one call gets the bits it gets
    in a 2-row call (itself twice), 1 if not even M = 2 holds; and whether a 1-row call differs from that. Probed
    once per `kernel` name, shape, dtype and thread count (the kernel a library picks depends on those and on M, not
    on the values): about MAX_TILE^2 / 2 rows."""
    key = (kernel, out_features, in_features, dtype, torch.get_num_threads())
    if key not in _tilings:
        _tilings[key] = _probe(call, in_features, dtype)
    return _tilings[key]


def _probe(call: Rows, in_features: int, dtype: torch.dtype) -> Tiling:
    x = _probe_rows(call, in_features, dtype)
    alone = torch.cat([call(x[i:i + 1].expand(2, -1))[:1] for i in range(MAX_TILE)])
    pad = any(not torch.equal(call(x[i:i + 1]), alone[i:i + 1]) for i in range(MAX_TILE))
    for m in range(2, MAX_TILE + 1):
        if not torch.equal(call(x[:m]), alone[:m]):
            return Tiling(m - 1, pad)
    return Tiling(MAX_TILE, pad)


def _probe_rows(call: Rows, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """[MAX_TILE, IN] rows whose results show a change in the order of the sum over IN. Random rows rarely do: the
    sums differ in low fp32 bits that rounding to bf16 hides. Row r holds, at its first and last input, two terms
    that cancel exactly in output column c_r (w[c,0] * w[c,-1] * s - w[c,-1] * w[c,0] * s, products exact), each
    about 2^22 times the other terms: whatever of the rest is added between them is rounded on the grid of the big
    term, so column c_r's bits say which terms were summed in which order."""
    x = torch.randn(MAX_TILE, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    ends = torch.zeros(2, in_features, dtype=dtype)
    ends[0, 0] = ends[1, -1] = 1
    w_first, w_last = call(ends).float()  # [OUT] each: the weight's first and last input columns
    cols = torch.linspace(0, w_first.shape[0] - 1, MAX_TILE).long()  # c_r, spread over the output blocks
    a, b = w_first[cols], w_last[cols]
    usable = (a != 0) & (b != 0)
    scale = torch.exp2(torch.round(torch.log2(2.0 ** 22 / b.abs().clamp_min(1e-30))))  # a power of two: exact
    x[usable, 0] = (b * scale)[usable].to(dtype)
    x[usable, -1] = (-a * scale)[usable].to(dtype)
    return x
