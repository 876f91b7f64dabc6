"""bf16 and fp32 linear layers on CPU through oneDNN with the weight re-laid once at load ("prepacked").

bf16: F.linear re-lays the weight for oneDNN on every call; packing once saves that work on every
decode-shaped GEMM, with bit-identical outputs.
fp32: F.linear calls MKL's sgemm; oneDNN's packed fp32 GEMM is faster on the default model's decode-shaped
linears and its LM head, with AVX2 kernels as with AVX-512. The sums run in another order, so fp32 outputs
match F.linear to rounding, not bit for bit.
This is what torch.compile's CPU weight prepacking does, without compiling the model. The reference is
`F.linear(x, weight, bias)`; tests/test_cpu_gemm.py holds the two equal.

Batch invariance (issue 41): `linear(..., tiling)` cuts every call into the row tiles that `invariant_tiling` found
for the packed weight's shape on this CPU (models/row_tiles.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from loraplex.models.row_tiles import Tiling, invariant_tiling as tiling_of, tiled

_BATCH_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works


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


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, tiling: Tiling | None = None
           ) -> torch.Tensor:
    """x: [..., IN] -> [..., OUT], = F.linear(x, weight, bias) for the weight `packed` came from.

    With `tiling` (invariant_tiling(packed)): in calls of at most `tiling.rows` rows, so that each row's bits follow
    from that row alone."""
    if tiling is None:
        return _call(x, packed, bias)
    return tiled(x, lambda rows: _call(rows, packed, bias), tiling)


def _call(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def invariant_tiling(packed: torch.Tensor) -> Tiling:
    """The row tiles in which each row's bits follow from that row alone, for this packed weight's shape
    (row_tiles.invariant_tiling)."""
    return tiling_of(lambda rows: _call(rows, packed, None), "onednn-packed", packed.shape[0], packed.shape[1],
                     packed.dtype)
