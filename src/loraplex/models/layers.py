"""Base layers of the model: a swappable linear layer that knows its packed parts, and RMSNorm."""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models import cpu_fused, cpu_gemm
from loraplex.models.batch import ForwardBatch
from loraplex.models.row_tiles import Tiling, invariant_tiling, tiled


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder layer a module belongs to ("model.layers.3.mlp.down_proj" -> 3), None outside the layers
    (embeddings, final norm, LM head). LoRA, quantization and memory accounting all act on these modules."""
    m = _LAYER_RE.search(module_name + ".")
    return None if m is None else int(m.group(1))


@runtime_checkable
class BaseLinear(Protocol):
    """A base linear the model prepacks at load, plain (Linear) or quantized (quant.linear.QuantLinear)."""

    tiling: Tiling | None  # batch-invariant: how its calls are cut into row tiles; None: not cut

    def prepack(self, batch_invariant: bool = False) -> bool: ...


class Linear(nn.Module):
    """y = x W^T (+ b). `parts` names the checkpoint matrices packed along the output axis.

    Packing (q,k,v -> qkv_proj; gate,up -> gate_up_proj) means one matmul per layer instead of
    three. LoRA wrappers and quantized replacements read `parts` to place their own tensors.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = tuple(parts)
        self.out_features = sum(size for _, size in parts)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's layout, once prepack() ran
        self.tiling: Tiling | None = None  # batch-invariant: how calls are cut into row tiles; None: not cut

    def prepack(self, batch_invariant: bool = False) -> bool:
        """Move the weight into oneDNN's CPU layout (bf16 or fp32, CPU only), freeing the plain copy; True if it
        did. With `batch_invariant` (CPU only), calls are cut into tiles of rows whose results do not depend on the
        other rows, packed or not."""
        packed = self.packed is None and cpu_gemm.supported(self.weight)
        if packed:
            self.packed = cpu_gemm.pack(self.weight)
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        if batch_invariant and self.tiling is None and (self.packed is not None or self.weight.device.type == "cpu"):
            self.tiling = dense_tiling(self.weight, self.packed)
        return packed

    def part_slice(self, name: str) -> slice:
        start = 0
        for part, size in self.parts:
            if part == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias, self.packed, self.tiling)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None = None,
                 tiling: Tiling | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): through `weight`'s oneDNN copy where it has one (cpu_gemm), in `tiling`'s row tiles
    where given (dense_tiling). Base linears, the tied LM head and a dequantized weight all run here."""
    if packed is not None:
        return cpu_gemm.linear(x, packed, bias, tiling)
    if tiling is not None:
        return tiled(x, lambda rows: F.linear(rows, weight, bias), tiling)
    return F.linear(x, weight, bias)


def dense_tiling(weight: torch.Tensor, packed: torch.Tensor | None = None) -> Tiling:
    """The row tiles of dense_linear on this [OUT, IN] weight (its packed copy where there is one), probed once per
    kernel, shape, dtype and thread count (row_tiles)."""
    if packed is not None:
        return cpu_gemm.invariant_tiling(packed)
    return invariant_tiling(lambda rows: F.linear(rows, weight), "F.linear", weight.shape[0], weight.shape[1],
                            weight.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as transformers does), scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x). x: [T, D].

        The sum is the decoder's residual stream; on CPU one fused call does both (cpu_fused), adding into
        `residual` in place."""
        if cpu_fused.supported(x) and x.dim() == 2:
            if residual is None:
                return cpu_fused.add_rmsnorm(x, x, self.weight, self.eps, add=False), x
            return cpu_fused.add_rmsnorm(x, residual, self.weight, self.eps, add=True), residual
        h = x if residual is None else x + residual
        return self.reference(h), h
