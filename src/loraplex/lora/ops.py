"""Multi-LoRA ops. `lora_reference` is the specification; the fast paths are tested against it.

Semantics (all paths):
    y[t] = (x[t] @ A[s_t]^T) @ B[s_t]   if s_t >= 0, else 0
Shapes:
    x: [T, IN]    A: [S, R, IN]    B: [S, R, OUT]    token_slots s: [T]    y: [T, OUT]
R is the slot's padded rank (packed layers stack their parts' ranks); the LoRA scaling is folded into B.
The fused kernels (C++ on CPU, Triton on CUDA) read B compact instead: [S, max_rank*OUT], see lora/slot_layout.py.
The torch kernels: `lora_grouped` (the default where no fused kernel runs) and `lora_tokenwise` (batch-invariant).
"""

from __future__ import annotations

import torch

from loraplex.lora import cpu_kernel
from loraplex.lora.mapping import LoRAMapping
from loraplex.lora.slot_layout import SlotLayout


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


def lora_grouped(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Segmented (SGMV-style): tokens gathered per slot into padded groups [S_k, Tmax], two bmm, the real rows
    scatter-added back (padded rows are dropped, whatever they hold). FLOPs ~ S_k * Tmax * R * (IN + OUT). With `out`, the result is added into it in place."""
    a_k, b_k = kernel_weights(a, b, m)  # [S_k, R, IN], [S_k, R, OUT]
    g = m.grouped
    assert g is not None
    if g.index is None:  # tokens are equal runs in slot order: views, no gather, no scatter
        xa = torch.bmm(x.view(a_k.shape[0], -1, x.shape[-1]), a_k.transpose(1, 2))  # [S_k, Tmax, R]
        if out is None:
            return torch.bmm(xa, b_k).view(x.shape[0], -1)
        out.view(a_k.shape[0], -1, out.shape[-1]).baddbmm_(xa, b_k)  # the expand accumulates into the base output
        return out
    xg = x.index_select(0, g.index.view(-1)).view(*g.index.shape, -1)  # [S_k, Tmax, IN]
    xa = torch.bmm(xg, a_k.transpose(1, 2))  # [S_k, Tmax, R]
    if out is None:
        out = torch.zeros(x.shape[0], b.shape[-1], dtype=x.dtype, device=x.device)
    # The expand accumulates into the gathered base rows (one rounding of base + LoRA, as the view path above
    # does), and each token's row is written back once: a token's result does not depend on whether its batch
    # took this path or that one, which in bf16 changed greedy answers with the batch's make-up.
    yg = out.index_select(0, g.index.view(-1)).view(*g.index.shape, -1).baddbmm_(xa, b_k).view(-1, out.shape[-1])
    if g.rows is None:  # no padded row: every row is a token
        return out.index_copy_(0, g.index.view(-1), yg)
    assert g.targets is not None
    return out.index_copy_(0, g.targets, yg.index_select(0, g.rows))  # padded rows selected away, never written


TOKEN_TILE = 32  # tokens per tokenwise pass: bounds its gathered copies (~4-13 MB in fp32 for the default model)


def lora_tokenwise(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant: a token's delta is summed over its own slot's weights only, each sum over a dimension whose
    length is the layer's (IN for the shrink, R for the expand), one row per output, in the same vectorised loop
    whatever the step holds; the grouped bmm instead sums in an order that its padded group shape picks. In fp32,
    xa rounded to the model dtype (as a bf16 matmul does), base + delta rounded once. With `out`, added in place.
    Shapes as lora_reference; FLOPs ~ N * R * (IN + OUT), with copies of each token's A and B (slower than
    grouped: it serves where batch invariance is asked for and the fused kernel does not run)."""
    rows = m.tokenwise
    assert rows is not None
    if out is None:
        out = torch.zeros(x.shape[0], b.shape[-1], dtype=x.dtype, device=x.device)
    for lo in range(0, rows.tokens.shape[0], TOKEN_TILE):
        t, s = rows.tokens[lo:lo + TOKEN_TILE], rows.slots[lo:lo + TOKEN_TILE]
        xa = (x.index_select(0, t).float()[:, None, :] * a.index_select(0, s).float()).sum(-1)  # [n, R, IN] -> [n, R]
        bt = b.index_select(0, s).transpose(1, 2).contiguous().float()  # [n, OUT, R]: R innermost, summed
        y = (xa.to(x.dtype).float()[:, None, :] * bt).sum(-1)  # [n, OUT]
        out.index_copy_(0, t, (out.index_select(0, t).float() + y).to(out.dtype))
    return out


def lora_fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping, layout: SlotLayout,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel (C++ on CPU, Triton on CUDA): per slot group, shrink and expand in one pass over
    that slot's A and compact B ([S, max_rank*OUT], lora/slot_layout.py), fp32 accumulation, skipping
    unused ranks. With `out`, added in place."""
    f = m.fused
    assert f is not None
    if out is None:
        out = torch.zeros(x.shape[0], sum(layout.part_sizes), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        return cpu_kernel.lora_add(x.contiguous(), a, b, f.order, f.groups, layout.ranks, layout.offsets,
                                   layout.max_rank, out)
    from loraplex.lora import triton_ops  # Triton is imported only where a GPU step needs it

    return triton_ops.lora_add(x.contiguous(), a, b, f.order, f.groups, layout.ranks, layout.offsets,
                               layout.max_rank, out, f.max_group, max(layout.part_sizes))


def lora_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping,
               out: torch.Tensor | None = None, layout: SlotLayout | None = None) -> torch.Tensor:
    """`layout` is needed by the fused kernel only (LoRALinear passes its own)."""
    if m.kernel == "fused":
        if layout is None or not layout.compact:
            raise ValueError("the fused LoRA kernel reads B in the compact layout")
        return lora_fused(x, a, b, m, layout, out)
    if layout is not None and layout.compact:
        raise ValueError(f"the {m.kernel} LoRA kernel reads B block-diagonal [S, R, OUT], not compact")
    if m.kernel == "tokenwise":
        return lora_tokenwise(x, a, b, m, out)
    return lora_grouped(x, a, b, m, out)
