"""LoRAMapping: which adapter slot each token of a step uses, precomputed once per step for every layer.

Built by the model runner from per-token slot indices (-1 = base model). Layers never loop over
requests or adapters: they read the index tensors prepared here.

Which slots a kernel reads ("kernel slots"): the distinct active slots, gathered per layer with
index_select (a weight copy), or, when the active slots nearly fill a contiguous range (the slot
table hands out the lowest free slot, so they usually do), that whole range as a view of the slot
tensors, with no copy. Slots in the range that no token uses are then read and multiplied by zero:
adapters with non-finite weights are refused at load, so this never leaks into other tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora import fused

# Kernel choice, from a profile of both paths on CPU (benchmarks/lora_kernels.py for the ops alone;
# decode steps of the default model in bf16 for the end-to-end check): the masked GEMM costs
# ~ T * S_k * R * (IN + OUT), the grouped path ~ S_k * Tmax * R * (IN + OUT) plus a gather and a
# scatter, which vanish when decode tokens come sorted by slot (the model runner sorts them). In
# decode steps grouped was faster from 2 adapters on; masked is kept for one adapter, where it is two
# plain GEMMs with no mask. Where the fused kernel runs (lora/fused.py: C++ on CPU in float32/bfloat16,
# Triton on CUDA) it serves every step instead: it reads each group's A and compact B once, and on CPU
# was 1.5-3x faster than either torch path at every batch the benchmark measures.
MASKED_MAX_ADAPTERS = 1


@dataclass(slots=True)
class LoRAMapping:
    token_slots: torch.Tensor  # [T] long, slot per token, -1 = no adapter
    active: tuple[int, ...]  # distinct slots used by some token this step (sorted), on the host
    active_slots: torch.Tensor  # [S_k] long, the kernel slots: `active`, or the contiguous range `span`
    span: slice | None  # kernel slots as a range: kernels read A[span], B[span] as views
    kernel: str  # "fused" | "masked" | "grouped"
    # fused: token indices grouped by slot [N] long, and the groups [G, 3] long: (slot, start in order, count)
    order: torch.Tensor | None
    groups: torch.Tensor | None
    max_group: int  # fused: the most tokens in one group (sizes the GPU kernels' grid); else 0
    # masked: [T, S_k, 1] 0/1 in model dtype; None when every token uses the single kernel slot
    token_mask: torch.Tensor | None
    # grouped: [S_k, Tmax] token indices per slot (padding -> 0), padding mask [S_k, Tmax, 1] or None.
    # group_index is None when the tokens already are S_k equal runs in slot order: x.view(S_k, Tmax, IN).
    group_index: torch.Tensor | None
    group_mask: torch.Tensor | None


def kernel_slots(active: list[int]) -> tuple[list[int], slice | None]:
    """The slots a kernel reads: the contiguous range over `active` if it pads at most a quarter, else `active`."""
    lo, hi = active[0], active[-1]
    if (hi - lo + 1) - len(active) <= len(active) // 4:
        return list(range(lo, hi + 1)), slice(lo, hi + 1)
    return active, None


def build_mapping(token_slots: list[int], dtype: torch.dtype, device: torch.device | str = "cpu",
                  kernel: str | None = None) -> LoRAMapping | None:
    """Return the mapping for one step, or None if no token uses an adapter.

    Built with Python lists and one tensor per field: ~30-45 us for a batch of 64 (benchmarks)."""
    active = sorted(set(token_slots))
    if active and active[0] < 0:
        active = active[1:]
    if not active:
        return None
    slots, span = kernel_slots(active)
    if kernel is None:
        if fused.supported(dtype, device):
            kernel = "fused"
        else:
            kernel = "masked" if len(active) <= MASKED_MAX_ADAPTERS else "grouped"
    token_mask = group_index = group_mask = order = groups_t = None
    max_group = 0
    if kernel == "fused":
        order_list = sorted((t for t, s in enumerate(token_slots) if s >= 0), key=token_slots.__getitem__)
        runs: list[list[int]] = []  # [slot, start, count]
        for k, t in enumerate(order_list):
            if runs and runs[-1][0] == token_slots[t]:
                runs[-1][2] += 1
            else:
                runs.append([token_slots[t], k, 1])
        order = torch.tensor(order_list, dtype=torch.long).to(device)
        groups_t = torch.tensor(runs, dtype=torch.long).to(device)
        max_group = max(run[2] for run in runs)
    elif kernel == "masked":
        if not (len(slots) == 1 and -1 not in token_slots):
            pos = {s: i for i, s in enumerate(slots)}
            rows = [[0.0] * len(slots) for _ in token_slots]
            for t, s in enumerate(token_slots):
                if s >= 0:
                    rows[t][pos[s]] = 1.0
            token_mask = torch.tensor(rows, dtype=dtype).unsqueeze(-1).to(device)
    elif kernel == "grouped":
        pos = {s: i for i, s in enumerate(slots)}
        groups: list[list[int]] = [[] for _ in slots]
        for t, s in enumerate(token_slots):
            if s >= 0:
                groups[pos[s]].append(t)
        tmax = max(len(g) for g in groups)
        if len(groups) * tmax == len(token_slots) and all(
                len(g) == tmax and g[0] == i * tmax and g[-1] == g[0] + tmax - 1 for i, g in enumerate(groups)):
            pass  # every token in a run of tmax, runs in slot order: the kernel reshapes, no index
        else:
            group_index = torch.tensor([g + [0] * (tmax - len(g)) for g in groups], dtype=torch.long).to(device)
            if any(len(g) != tmax for g in groups):
                valid = [[1.0] * len(g) + [0.0] * (tmax - len(g)) for g in groups]
                group_mask = torch.tensor(valid, dtype=dtype).unsqueeze(-1).to(device)
    else:
        raise ValueError(f"unknown LoRA kernel {kernel!r}")
    return LoRAMapping(
        token_slots=torch.tensor(token_slots, dtype=torch.long).to(device),
        active=tuple(active),
        active_slots=torch.tensor(slots, dtype=torch.long).to(device),
        span=span,
        kernel=kernel,
        order=order,
        groups=groups_t,
        max_group=max_group,
        token_mask=token_mask,
        group_index=group_index,
        group_mask=group_mask,
    )
