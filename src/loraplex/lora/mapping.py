"""LoRAMapping: which adapter slot each token of a step uses, precomputed once per step for every layer.

Built by the model runner from per-token slot indices (-1 = base model). Layers never loop over
requests or adapters: they read the index tensors prepared here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The masked GEMM (one matmul against the concatenated A matrices, per-token mask, one against the
# stacked B) costs FLOPs in proportion to the distinct adapters in the step; the grouped path (tokens
# sorted by slot into padded segments, two bmm) pays gathers instead. Masked is used up to this many
# adapters: a first estimate, not yet tuned by a profile of both paths.
MASKED_MAX_ADAPTERS = 2


@dataclass(slots=True)
class LoRAMapping:
    token_slots: torch.Tensor  # [T] long, slot per token, -1 = no adapter
    active_slots: torch.Tensor  # [S_a] long, distinct slots used this step (sorted)
    kernel: str  # "masked" | "grouped"
    # masked: [T, S_a, 1] 0/1 in model dtype; None when every token uses the single active slot
    token_mask: torch.Tensor | None
    # grouped: [S_a, Tmax] token indices per slot (padding -> 0), padding mask [S_a, Tmax, 1] or None
    group_index: torch.Tensor | None
    group_mask: torch.Tensor | None


def build_mapping(token_slots: list[int], dtype: torch.dtype, device: torch.device | str = "cpu",
                  kernel: str | None = None) -> LoRAMapping | None:
    """Return the mapping for one step, or None if no token uses an adapter."""
    active = sorted({s for s in token_slots if s >= 0})
    if not active:
        return None
    num_tokens = len(token_slots)
    if kernel is None:
        kernel = "masked" if len(active) <= MASKED_MAX_ADAPTERS else "grouped"
    slots_t = torch.tensor(token_slots, dtype=torch.long)
    active_t = torch.tensor(active, dtype=torch.long)
    token_mask = group_index = group_mask = None
    if kernel == "masked":
        if not (len(active) == 1 and all(s == active[0] for s in token_slots)):
            token_mask = (slots_t[:, None] == active_t[None, :]).to(dtype).unsqueeze(-1)
    elif kernel == "grouped":
        groups: list[list[int]] = [[] for _ in active]
        pos = {s: i for i, s in enumerate(active)}
        for t, s in enumerate(token_slots):
            if s >= 0:
                groups[pos[s]].append(t)
        tmax = max(len(g) for g in groups)
        group_index = torch.zeros(len(active), tmax, dtype=torch.long)
        valid = torch.zeros(len(active), tmax, dtype=torch.bool)
        for i, g in enumerate(groups):
            group_index[i, : len(g)] = torch.tensor(g, dtype=torch.long)
            valid[i, : len(g)] = True
        if not bool(valid.all()):
            group_mask = valid.to(dtype).unsqueeze(-1).to(device)
        group_index = group_index.to(device)
    else:
        raise ValueError(f"unknown LoRA kernel {kernel!r}")
    return LoRAMapping(
        token_slots=slots_t.to(device),
        active_slots=active_t.to(device),
        kernel=kernel,
        token_mask=None if token_mask is None else token_mask.to(device),
        group_index=group_index,
        group_mask=group_mask,
    )
