"""LoRA layer wrappers, swapped in for the model's Linear layers by module replacement.

Each wrapper owns the device slots of one linear layer: A [S, R, IN] with R = parts * max_rank, and B.
Part p of a packed layer (q/k/v, gate/up) uses rows [p*max_rank, p*max_rank + r) of A and B, and only
its own output columns in B, so one adapter may target any subset of parts and any rank up to
max_rank; unused rows stay zero. B's layout follows the kernel that will read it:
- torch kernels (ops.lora_masked / lora_grouped): block-diagonal [S, R, OUT];
- the fused kernel (lora/fused.py: C++ on CPU, Triton on CUDA): compact [S, max_rank * OUT], part p's block
  [max_rank, size_p] at max_rank * offset_p, so a slot's B is one contiguous read with no zero blocks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from loraplex.lora import fused
from loraplex.lora.ops import SlotLayout, lora_apply
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
        # B's layout follows the kernel: the model runner's mapping picks the fused kernel by the same test.
        compact = fused.supported(dtype, device)
        self.lora_a = torch.zeros(max_loras, rows, self.in_features, dtype=dtype, device=device)
        b_shape = (max_loras, max_rank * self.out_features) if compact else (max_loras, rows, self.out_features)
        self.lora_b = torch.zeros(b_shape, dtype=dtype, device=device)
        # Slots whose adapter has weights in this layer: a step whose adapters all skip the layer
        # (e.g. attention-only adapters at an MLP layer) pays nothing here.
        self.slot_used = [False] * max_loras
        sizes = tuple(size for _, size in self.parts)
        self.offsets = [0, *itertools.accumulate(sizes)]  # the parts' output column bounds, on the host
        self.layout = SlotLayout(ranks=torch.zeros(max_loras, len(self.parts), dtype=torch.int32, device=device),
                                 offsets=torch.tensor(self.offsets, dtype=torch.long, device=device),
                                 part_sizes=sizes, max_rank=max_rank, compact=compact)

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
        for p, (name, size) in enumerate(self.parts):
            w = weights.get(name)
            if w is not None:
                r, start = w.a.shape[0], self.offsets[p]
                self.lora_a[slot, p * self.max_rank : p * self.max_rank + r] = w.a.to(self.lora_a.dtype)
                # Fold the scaling into B, stored transposed so the expand is x_a @ B: [r, size].
                b = (w.b.float() * w.scale).T.to(self.lora_b.dtype)
                if self.layout.compact:
                    block = self.max_rank * start
                    self.lora_b[slot, block : block + self.max_rank * size].view(self.max_rank, size)[:r] = b
                else:
                    self.lora_b[slot, p * self.max_rank : p * self.max_rank + r, start : start + size] = b
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
