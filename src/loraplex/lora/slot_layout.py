"""SlotShape: where a layer's device slots hold an adapter's weights — the one place this layout is written down;
SlotLayout: a SlotShape with the per-slot ranks and part offsets the kernels read on the device.
The LoRA layers fill it (lora/layers.py), the kernels read it (lora/ops.py, cpu_kernel, triton_ops), memory
accounting sizes it (engine/memory.py).

A layer packs parts along its output axis (q/k/v, or gate/up, or one part). Per slot:
- A [P*max_rank, IN]: part p owns rows [p*max_rank, p*max_rank + r_p);
- B, compact (the fused kernels: C++ on CPU, Triton on CUDA): [max_rank*OUT], part p's block [max_rank, size_p]
  at max_rank*offset_p, so a slot's B is one contiguous read with no zero blocks;
- B, block-diagonal (the torch kernels): [P*max_rank, OUT], part p's block at rows [p*max_rank, ...) and
  columns [offset_p, offset_p + size_p).
Unused rows (ranks below max_rank, parts an adapter leaves alone) stay zero. The LoRA scaling is folded into B,
stored transposed so that the expand is x_a @ B.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, slots=True)
class SlotShape:
    part_sizes: tuple[int, ...]  # output width of each packed part
    in_features: int
    max_rank: int
    compact: bool  # B compact (fused kernels) or block-diagonal (torch kernels)

    @property
    def offsets(self) -> list[int]:
        """The parts' output column bounds: [0, size_0, size_0 + size_1, ...]."""
        return [0, *itertools.accumulate(self.part_sizes)]

    @property
    def out_features(self) -> int:
        return sum(self.part_sizes)

    @property
    def rows(self) -> int:
        """A's rows per slot (and B's, block-diagonal): every part's max_rank."""
        return len(self.part_sizes) * self.max_rank

    def a_shape(self, slots: int) -> tuple[int, int, int]:
        return (slots, self.rows, self.in_features)

    def b_shape(self, slots: int) -> tuple[int, ...]:
        if self.compact:
            return (slots, self.max_rank * self.out_features)
        return (slots, self.rows, self.out_features)

    @property
    def slot_elements(self) -> int:
        """Elements of A and B one slot holds."""
        return self.rows * self.in_features + (self.max_rank if self.compact else self.rows) * self.out_features

    def a_part(self, a_slot: torch.Tensor, p: int) -> torch.Tensor:
        """Part p's rows of one slot's A [rows, IN]: a view [max_rank, IN]."""
        return a_slot[p * self.max_rank : (p + 1) * self.max_rank]

    def b_part(self, b_slot: torch.Tensor, p: int) -> torch.Tensor:
        """Part p's block of one slot's B (compact [max_rank*OUT] or block-diagonal [rows, OUT]): a view
        [max_rank, size_p]."""
        lo, size = self.offsets[p], self.part_sizes[p]
        if self.compact:
            return b_slot[self.max_rank * lo : self.max_rank * (lo + size)].view(self.max_rank, size)
        return b_slot[p * self.max_rank : (p + 1) * self.max_rank, lo : lo + size]

    def to_compact(self, b: torch.Tensor) -> torch.Tensor:
        """Block-diagonal B [S, rows, OUT] -> compact [S, max_rank*OUT] (for tests and benchmarks of the kernels)."""
        diagonal, compact = replace(self, compact=False), replace(self, compact=True)
        out = torch.zeros(compact.b_shape(b.shape[0]), dtype=b.dtype, device=b.device)
        for s in range(b.shape[0]):
            for p in range(len(self.part_sizes)):
                compact.b_part(out[s], p).copy_(diagonal.b_part(b[s], p))
        return out


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """A layer's SlotShape with what the kernels read on the device to skip the zeros:
    part p of slot s uses ranks[s, p] of its max_rank rows, and B's columns [offsets[p], offsets[p+1])."""
    shape: SlotShape
    ranks: torch.Tensor  # [S, P] int32, rows in use per slot and part (0: the adapter leaves the part alone)
    offsets: torch.Tensor  # [P+1] long, the parts' output column bounds

    @classmethod
    def on(cls, shape: SlotShape, slots: int, device: torch.device | str, ranks: torch.Tensor | None = None) -> SlotLayout:
        zeros = torch.zeros(slots, len(shape.part_sizes), dtype=torch.int32)
        return cls(shape, (zeros if ranks is None else ranks.to(torch.int32)).to(device),
                   torch.tensor(shape.offsets, dtype=torch.long, device=device))

    @property
    def part_sizes(self) -> tuple[int, ...]:
        return self.shape.part_sizes

    @property
    def max_rank(self) -> int:
        return self.shape.max_rank

    @property
    def compact(self) -> bool:
        return self.shape.compact
