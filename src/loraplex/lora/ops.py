"""Multi-LoRA ops. `lora_reference` is the specification; the fast paths are tested against it.

Semantics (all paths):
    y[t] = (x[t] @ A[s_t]^T) @ B[s_t]   if s_t >= 0, else 0
Shapes:
    x: [T, IN]    A: [S, R, IN]    B: [S, R, OUT]    token_slots s: [T]    y: [T, OUT]
R is the slot's padded rank (packed layers stack their parts' ranks); the LoRA scaling is folded into B.
"""

from __future__ import annotations

import torch

from loraplex.lora.mapping import LoRAMapping


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Token-by-token fp32 loop: slow, obviously correct."""
    y = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            y[t] = (x[t].float() @ a[s].float().T) @ b[s].float()
    return y.to(x.dtype)


def lora_masked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping) -> torch.Tensor:
    """One GEMM against the concatenated A of the active slots, zero the other slots' columns per token,
    one GEMM against the stacked B. FLOPs grow with the number of active slots; no weight copy when one."""
    sa = m.active_slots.shape[0]
    r = a.shape[1]
    if sa == 1:
        s = int(m.active_slots[0]) if m.active_slots.device.type == "cpu" else m.active_slots[0]
        a_act, b_act = a[s], b[s]  # [R, IN], [R, OUT] views
    else:
        a_act = a.index_select(0, m.active_slots).reshape(sa * r, -1)
        b_act = b.index_select(0, m.active_slots).reshape(sa * r, -1)
    xa = x @ a_act.T  # [T, S_a*R]
    if m.token_mask is not None:
        xa = (xa.view(-1, sa, r) * m.token_mask).view(-1, sa * r)
    return xa @ b_act


def lora_grouped(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping) -> torch.Tensor:
    """Segmented (SGMV-style): tokens gathered per slot into padded groups [S_a, Tmax], two bmm, scatter-add back.
    FLOPs ~ S_a * Tmax * R * (IN + OUT); weight copy ~ S_a * R * (IN + OUT)."""
    assert m.group_index is not None
    a_act = a.index_select(0, m.active_slots)  # [S_a, R, IN]
    b_act = b.index_select(0, m.active_slots)  # [S_a, R, OUT]
    xg = x[m.group_index]  # [S_a, Tmax, IN]
    yg = torch.bmm(torch.bmm(xg, a_act.transpose(1, 2)), b_act)  # [S_a, Tmax, OUT]
    if m.group_mask is not None:
        yg = yg * m.group_mask
    y = torch.zeros(x.shape[0], b.shape[-1], dtype=x.dtype, device=x.device)
    return y.index_add_(0, m.group_index.view(-1), yg.view(-1, yg.shape[-1]))


def lora_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: LoRAMapping) -> torch.Tensor:
    if m.kernel == "masked":
        return lora_masked(x, a, b, m)
    return lora_grouped(x, a, b, m)
