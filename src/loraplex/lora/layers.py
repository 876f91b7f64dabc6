"""LoRA layer wrappers, swapped in for the model's Linear layers by module replacement.

Each wrapper owns the device slots of one linear layer, laid out as lora/slot_layout.py describes: one adapter
may target any subset of a packed layer's parts (q/k/v, gate/up) at any rank up to max_rank, and B's layout
follows the kernel that will read it (compact for the fused kernels, block-diagonal for the torch one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.lora import kernel_choice
from loraplex.lora.ops import lora_apply
from loraplex.lora.slot_layout import SlotLayout, SlotShape
from loraplex.models.batch import ForwardBatch
from loraplex.models.layers import Linear, layer_index
from loraplex.quant.linear import QuantLinear


@dataclass(frozen=True, slots=True)
class PartWeights:
    a: torch.Tensor  # [r, IN]
    b: torch.Tensor  # [OUT_part, r]
    scale: float


def slot_layout(parts: tuple[tuple[str, int], ...], in_features: int, max_rank: int, dtype: torch.dtype,
                device: torch.device) -> SlotShape:
    """A layer's slot layout: B compact where the fused kernel serves this dtype and device (the model runner's
    mapping picks the kernel by the same test), else block-diagonal."""
    return SlotShape(tuple(size for _, size in parts), in_features, max_rank, kernel_choice.supported(dtype, device))


class LoRALinear(nn.Module):
    def __init__(self, base: Linear | QuantLinear, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.parts: tuple[tuple[str, int], ...] = base.parts
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.max_rank = max_rank
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.shape = slot_layout(self.parts, self.in_features, max_rank, dtype, device)
        self.lora_a = torch.zeros(self.shape.a_shape(max_loras), dtype=dtype, device=device)
        self.lora_b = torch.zeros(self.shape.b_shape(max_loras), dtype=dtype, device=device)
        # Slots whose adapter has weights in this layer: a step whose adapters all skip the layer
        # (e.g. attention-only adapters at an MLP layer) pays nothing here.
        self.slot_used = [False] * max_loras
        self.layout = SlotLayout.on(self.shape, max_loras, device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        y = self.base(x, batch)
        m = batch.lora if batch is not None else None
        if m is not None and any(self.slot_used[s] for s in m.active):
            lora_apply(x, self.lora_a, self.lora_b, m, out=y, layout=self.layout)  # added into the base output in place
        return y

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.layout.ranks[slot] = 0
        self.slot_used[slot] = False

    def set_slot(self, slot: int, weights: dict[str, PartWeights]) -> None:
        """Write one adapter's parts into `slot` (parts absent from `weights` stay zero)."""
        if not weights and not self.slot_used[slot]:
            return  # already all zero: e.g. an attention-only adapter at an MLP layer, ~half the copy work
        self.clear_slot(slot)
        for p, (name, _) in enumerate(self.parts):
            w = weights.get(name)
            if w is not None:
                r = w.a.shape[0]
                self.shape.a_part(self.lora_a[slot], p)[:r] = w.a.to(self.lora_a.dtype)
                # Fold the scaling into B, stored transposed so the expand is x_a @ B: [r, size].
                self.shape.b_part(self.lora_b[slot], p)[:r] = (w.b.float() * w.scale).T.to(self.lora_b.dtype)
                self.layout.ranks[slot, p] = r
                self.slot_used[slot] = True


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
