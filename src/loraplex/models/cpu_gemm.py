"""bf16 and fp32 linear layers on CPU through oneDNN with the weight re-laid once at load ("prepacked").

bf16: F.linear re-lays the weight for oneDNN on every call; packing once saves that work on every
decode-shaped GEMM, with bit-identical outputs.
fp32: F.linear calls MKL's sgemm; oneDNN's packed fp32 GEMM is faster on the default model's decode-shaped
linears and its LM head, with AVX2 kernels as with AVX-512. The sums run in another order, so fp32 outputs
match F.linear to rounding, not bit for bit.
This is what torch.compile's CPU weight prepacking does, without compiling the model. The reference is
`F.linear(x, weight, bias)`; tests/test_cpu_gemm.py holds the two equal.

Batch invariance (issue 41): oneDNN picks its kernel, and with it the order of each row's sum over IN, by the
shape of the call, M rows included. So a row's bits can depend on how many rows share its call (bf16 on AMX: from
M = 33; fp32 down_proj: M = 1 against M >= 2). `linear(..., tiling)` calls the kernel on tiles of at most
`tiling.rows` rows, a 1-row tile padded to 2 where the 1-row kernel sums in another order, and `invariant_tiling`
finds both at start, for each weight shape on this CPU and thread count: the largest T for which every row of every
M in 2..T gets the bits it gets in a 2-row call, and whether a 1-row call does too. The engine then only ever
makes calls whose shapes were probed, so a row's result depends on that row alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_BATCH_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works
MAX_TILE = 64  # the most rows per call the invariance probe tries (and a batch-invariant call makes)


DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN's prepacked linear exists in this torch build and gives F.linear's result on a probe."""
    ops = torch.ops.mkldnn
    if dtype not in DTYPES or not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                                   and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        w = torch.randn(24, 40).to(dtype)
        x = torch.randn(3, 40).to(dtype)
        return bool(torch.allclose(linear(x, pack(w), None), F.linear(x, w), rtol=1e-5, atol=1e-5))
    except (RuntimeError, NotImplementedError):
        return False


def supported(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and available(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[OUT, IN] bf16 or fp32 -> an opaque oneDNN tensor of the same shape, for `linear` only."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)


@dataclass(frozen=True, slots=True)
class Tiling:
    """How one packed linear's calls are cut so that each row's bits follow from that row alone."""
    rows: int  # the most rows per call
    pad_single: bool  # a lone row is called as two (itself twice): its 1-row kernel sums in another order


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, tiling: Tiling | None = None
           ) -> torch.Tensor:
    """x: [..., IN] -> [..., OUT], = F.linear(x, weight, bias) for the weight `packed` came from.

    With `tiling` (invariant_tiling(packed)): in calls of at most `tiling.rows` rows, so that each row's bits follow
    from that row alone."""
    if tiling is None:
        return _call(x, packed, bias)
    rows = x.reshape(-1, x.shape[-1])
    n, size, pad = rows.shape[0], tiling.rows, tiling.pad_single
    if n <= size and (n > 1 or not pad):
        return _call(x, packed, bias)
    parts = [rows[i:i + size] for i in range(0, n, size)]
    out = torch.cat([_call(p.expand(2, -1), packed, bias)[:1] if pad and p.shape[0] == 1 else _call(p, packed, bias)
                     for p in parts])
    return out.view(*x.shape[:-1], out.shape[-1])


def _call(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_tilings: dict[tuple[int, int, torch.dtype, int], Tiling] = {}  # (OUT, IN, dtype, threads) -> invariant_tiling's


def invariant_tiling(packed: torch.Tensor) -> Tiling:
    """The largest T <= MAX_TILE such that, for every M in 2..T, each of M rows in one call gets the bits it gets
    in a 2-row call (itself twice), 1 if not even M = 2 holds; and whether a 1-row call differs from that. Probed
    once per shape, dtype and thread count (the kernel oneDNN picks depends on those and on M, not on the values):
    about MAX_TILE^2 / 2 rows."""
    key = (packed.shape[0], packed.shape[1], packed.dtype, torch.get_num_threads())
    if key not in _tilings:
        _tilings[key] = _probe(packed)
    return _tilings[key]


def _probe(packed: torch.Tensor) -> Tiling:
    x = _probe_rows(packed)
    alone = torch.cat([_call(x[i:i + 1].expand(2, -1), packed, None)[:1] for i in range(MAX_TILE)])
    pad = any(not torch.equal(_call(x[i:i + 1], packed, None), alone[i:i + 1]) for i in range(MAX_TILE))
    for m in range(2, MAX_TILE + 1):
        if not torch.equal(_call(x[:m], packed, None), alone[:m]):
            return Tiling(m - 1, pad)
    return Tiling(MAX_TILE, pad)


def _probe_rows(packed: torch.Tensor) -> torch.Tensor:
    """[MAX_TILE, IN] rows whose results show a change in the order of the sum over IN. Random rows rarely do: the
    sums differ in low fp32 bits that rounding to bf16 hides. Row r holds, at its first and last input, two terms
    that cancel exactly in output column c_r (w[c,0] * w[c,-1] * s - w[c,-1] * w[c,0] * s, products exact), each
    about 2^22 times the other terms: whatever of the rest is added between them is rounded on the grid of the big
    term, so column c_r's bits say which terms were summed in which order."""
    out_f, in_f = packed.shape
    x = torch.randn(MAX_TILE, in_f, generator=torch.Generator().manual_seed(0)).to(packed.dtype)
    ends = torch.zeros(2, in_f, dtype=packed.dtype)
    ends[0, 0] = ends[1, -1] = 1
    w_first, w_last = _call(ends, packed, None).float()  # [OUT] each: the weight's first and last input columns
    cols = torch.linspace(0, out_f - 1, MAX_TILE).long()  # c_r, spread over the output blocks
    a, b = w_first[cols], w_last[cols]
    usable = (a != 0) & (b != 0)
    scale = torch.exp2(torch.round(torch.log2(2.0 ** 22 / b.abs().clamp_min(1e-30))))  # a power of two: exact
    x[usable, 0] = (b * scale)[usable].to(packed.dtype)
    x[usable, -1] = (-a * scale)[usable].to(packed.dtype)
    return x
