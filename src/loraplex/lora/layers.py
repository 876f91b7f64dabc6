"""LoRA layer wrappers, swapped in for the model's Linear layers by module replacement.

Each wrapper owns the device slots of one linear layer: A [S, R, IN], B [S, R, OUT], where
R = parts * max_rank. Part p of a packed layer (q/k/v, gate/up) uses rows [p*max_rank, p*max_rank + r)
of A and B, and only its own output columns in B, so one adapter may target any subset of parts
and any rank up to max_rank; unused rows stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.lora.ops import lora_apply
from loraplex.models.batch import ForwardBatch
from loraplex.models.layers import Linear, layer_index
from loraplex.quant.linear import QuantLinear


@dataclass(frozen=True, slots=True)
class PartWeights:
    a: torch.Tensor  # [r, IN]
    b: torch.Tensor  # [OUT_part, r]
    scale: float


class LoRALinear(nn.Module):
    def __init__(self, base: Linear | QuantLinear, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.parts: tuple[tuple[str, int], ...] = base.parts
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.max_rank = max_rank
        rows = len(self.parts) * max_rank
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_a = torch.zeros(max_loras, rows, self.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, rows, self.out_features, dtype=dtype, device=device)
        # Slots whose adapter has weights in this layer: a step whose adapters all skip the layer
        # (e.g. attention-only adapters at an MLP layer) pays nothing here.
        self.slot_used = [False] * max_loras

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        y = self.base(x, batch)
        m = batch.lora if batch is not None else None
        if m is not None and any(self.slot_used[s] for s in m.active):
            lora_apply(x, self.lora_a, self.lora_b, m, out=y)  # added into the base output in place
        return y

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.slot_used[slot] = False

    def set_slot(self, slot: int, weights: dict[str, PartWeights]) -> None:
        """Write one adapter's parts into `slot` (parts absent from `weights` stay zero)."""
        if not weights and not self.slot_used[slot]:
            return  # already all zero: e.g. an attention-only adapter at an MLP layer, ~half the copy work
        self.clear_slot(slot)
        out_start = 0
        for p, (name, size) in enumerate(self.parts):
            w = weights.get(name)
            if w is not None:
                r = w.a.shape[0]
                rows = slice(p * self.max_rank, p * self.max_rank + r)
                self.lora_a[slot, rows] = w.a.to(self.lora_a.dtype)
                # Fold the scaling into B, stored transposed so the expand is x_a @ B: [R, OUT].
                self.lora_b[slot, rows, out_start : out_start + size] = (w.b.float() * w.scale).T.to(self.lora_b.dtype)
                self.slot_used[slot] = True
            out_start += size


def attach_lora(model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype) -> dict[tuple[int, str], LoRALinear]:
    """Replace every per-layer Linear (plain or quantized) of `model` by a LoRALinear; return (layer index,
    part name) -> wrapper."""
    targets: dict[tuple[int, str], LoRALinear] = {}
    for name, module in list(model.named_modules()):
        layer = layer_index(name)
        if not isinstance(module, (Linear, QuantLinear)) or layer is None:
            continue
        wrapper = LoRALinear(module, max_loras, max_rank, dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
        for part, _ in module.parts:
            targets[(layer, part)] = wrapper
    return targets
