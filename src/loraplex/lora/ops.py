"""Multi-LoRA ops. `lora_reference` is the specification; the fast paths are tested against it.

Semantics (all paths):
    y[t] = (x[t] @ A[s_t]^T) @ B[s_t]   if s_t >= 0, else 0
Shapes:
    x: [T, IN]    A: [S, R, IN]    B: [S, R, OUT]    token_slots s: [T]    y: [T, OUT]
R is the slot's padded rank (packed layers stack their parts' ranks); the LoRA scaling is folded into B.
The fused kernels (C++ on CPU, Triton on CUDA) read B compact instead: [S, max_rank*OUT], see SlotLayout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora import cpu_kernel
from loraplex.lora.mapping import LoRAMapping


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Where a layer's slots hold weights, so a kernel can skip the zeros: packed part p owns rows
    [p*max_rank, p*max_rank + ranks[s, p]) of A and B, and B's columns [offsets[p], offsets[p+1])."""
    ranks: torch.Tensor  # [S, P] int32, rows in use per slot and part (0: the adapter leaves the part alone)
    offsets: torch.Tensor  # [P+1] long, the parts' output column bounds
    part_sizes: tuple[int, ...]  # the parts' output widths, on the host
    max_rank: int
    compact: bool  # B held as [S, max_rank*OUT] for the fused kernel, else block-diagonal [S, R, OUT]


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Token-by-token fp32 loop: slow, obviously correct."""
    y = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            y[t] = (x[t].float() @ a[s].float().T) @ b[s].float()
    return y.to(x.dtype)


def kernel_weights(a: torch.Tensor, b: torch.Tensor, m: LoRAMapping) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B of the kernel slots: [S_k, R, IN], [S_k, R, OUT]; views when the slots are a range, else copies."""
    if m.span is not None:
        return a[m.span], b[m.span]
    return a.index_select(0, m.active_slots), b.index_select(0, m.active_slots)


def lora_masked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One GEMM against the concatenated A of the kernel slots, zero the other slots' columns per token,
    one GEMM against the stacked B. FLOPs grow with the number of kernel slots.
    With `out` ([T, OUT], contiguous), the result is added into it in place (the base layer's output)."""
    a_k, b_k = kernel_weights(a, b, m)
    sk, r = a_k.shape[0], a_k.shape[1]
    xa = x @ a_k.reshape(sk * r, -1).T  # [T, S_k*R]
    if m.token_mask is not None:
        xa = (xa.view(-1, sk, r) * m.token_mask).view(-1, sk * r)
    b_flat = b_k.reshape(sk * r, -1)
    return xa @ b_flat if out is None else out.addmm_(xa, b_flat)


def lora_grouped(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Segmented (SGMV-style): tokens gathered per slot into padded groups [S_k, Tmax], two bmm, scatter-add back.
    FLOPs ~ S_k * Tmax * R * (IN + OUT). With `out`, the result is added into it in place."""
    a_k, b_k = kernel_weights(a, b, m)  # [S_k, R, IN], [S_k, R, OUT]
    if m.group_index is None:  # tokens are equal runs in slot order: views, no gather, no scatter
        xa = torch.bmm(x.view(a_k.shape[0], -1, x.shape[-1]), a_k.transpose(1, 2))  # [S_k, Tmax, R]
        if out is None:
            return torch.bmm(xa, b_k).view(x.shape[0], -1)
        out.view(a_k.shape[0], -1, out.shape[-1]).baddbmm_(xa, b_k)  # the expand accumulates into the base output
        return out
    xg = x.index_select(0, m.group_index.view(-1)).view(*m.group_index.shape, -1)  # [S_k, Tmax, IN]
    yg = torch.bmm(torch.bmm(xg, a_k.transpose(1, 2)), b_k)  # [S_k, Tmax, OUT]
    if m.group_mask is not None:
        yg = yg * m.group_mask
    if out is None:
        out = torch.zeros(x.shape[0], b.shape[-1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, m.group_index.view(-1), yg.view(-1, yg.shape[-1]))


def lora_fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping, layout: SlotLayout,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel (C++ on CPU, Triton on CUDA): per slot group, shrink and expand in one pass over
    that slot's A and compact B ([S, max_rank*OUT], cpu_kernel.compact_b), fp32 accumulation, skipping
    unused ranks. With `out`, added in place."""
    assert m.order is not None and m.groups is not None
    if out is None:
        out = torch.zeros(x.shape[0], sum(layout.part_sizes), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        return cpu_kernel.lora_add(x.contiguous(), a, b, m.order, m.groups, layout.ranks, layout.offsets,
                                   layout.max_rank, out)
    from loraplex.lora import triton_ops  # Triton is imported only where a GPU step needs it

    return triton_ops.lora_add(x.contiguous(), a, b, m.order, m.groups, layout.ranks, layout.offsets,
                               layout.max_rank, out, m.max_group, max(layout.part_sizes))


def lora_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
               out: torch.Tensor | None = None, layout: SlotLayout | None = None) -> torch.Tensor:
    """`layout` is needed by the fused kernel only (LoRALinear passes its own)."""
    if m.kernel == "fused":
        if layout is None or not layout.compact:
            raise ValueError("the fused LoRA kernel reads B in the compact layout")
        return lora_fused(x, a, b, m, layout, out)
    if layout is not None and layout.compact:
        raise ValueError(f"the {m.kernel} LoRA kernel reads B block-diagonal [S, R, OUT], not compact")
    if m.kernel == "masked":
        return lora_masked(x, a, b, m, out)
    return lora_grouped(x, a, b, m, out)
