"""LoRAMapping: which adapter slot each token of a step uses, precomputed once per step for every layer.

Built by the model runner from per-token slot indices (-1 = base model). Layers never loop over
requests or adapters: they read the index tensors prepared here.

Which slots a kernel reads ("kernel slots"): the distinct active slots, gathered per layer with
index_select (a weight copy), or, when the active slots nearly fill a contiguous range (the slot
table hands out the lowest free slot, so they usually do), that whole range as a view of the slot
tensors, with no copy. Slots in the range that no token uses are then read into padded rows only, and a
padded row is never added into a token (GroupedBatches.rows): whatever such a slot holds, NaN included, stays
out of every token's output. The fused kernels read only the slots and ranks in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora import kernel_choice

# Kernel choice: where the fused kernel runs (lora/kernel_choice.py: C++ on CPU in float32/bfloat16, Triton on
# CUDA) it serves every step: it reads each group's A and compact B once and skips the unused ranks, where the torch
# kernels read the zeros and pay a gather and a scatter (benchmarks/lora_kernels.py times both at every batch;
# the profile is in docs/benchmarks/REPORT.md). Elsewhere one torch kernel serves: the grouped
# (SGMV-style) bmm, ~ S_k * Tmax * R * (IN + OUT) FLOPs plus a gather and a scatter that vanish when decode
# tokens come sorted by slot (the model runner sorts them).
# The third, "tokenwise", serves batch-invariant engines where the fused kernel does not run (lora/ops.py,
# lora_tokenwise): each token's sums over its own slot's weights, in an order fixed by the layer's shape alone.
KERNELS = ("fused", "grouped", "tokenwise")


@dataclass(slots=True)
class FusedGroups:
    """The fused kernels' metadata: token indices grouped by slot, and the groups."""

    order: torch.Tensor  # [N] long, the tokens with an adapter, grouped by slot
    groups: torch.Tensor  # [G, 3] long: (slot, start in order, count)
    max_group: int  # the most tokens in one group (sizes the GPU kernels' grid)


@dataclass(slots=True)
class GroupedBatches:
    """The torch grouped kernel's metadata: tokens gathered per kernel slot into padded rows."""

    index: torch.Tensor | None  # [S_k, Tmax] token indices per slot (padding -> 0); None: x.view(S_k, Tmax, IN)
    # Where some row is padded: rows [N], the flat positions in [S_k * Tmax] that hold a real token, and
    # targets [N], those tokens. Only those rows are scattered back: a padded row (computed on token 0's
    # activations with another slot's weights, maybe non-finite) is selected away, never multiplied by 0.
    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None


@dataclass(slots=True)
class TokenRows:
    """The tokenwise kernel's metadata: the tokens that use an adapter, and their slots."""

    tokens: torch.Tensor  # [N] long, token indices
    slots: torch.Tensor  # [N] long, their slots


@dataclass(slots=True)
class LoRAMapping:
    token_slots: torch.Tensor  # [T] long, slot per token, -1 = no adapter
    active: tuple[int, ...]  # distinct slots used by some token this step (sorted), on the host
    active_slots: torch.Tensor  # [S_k] long, the kernel slots: `active`, or the contiguous range `span`
    span: slice | None  # kernel slots as a range: kernels read A[span], B[span] as views
    fused: FusedGroups | None = None  # set when the fused kernel runs this step
    grouped: GroupedBatches | None = None  # set when the torch grouped kernel does
    tokenwise: TokenRows | None = None  # set when the torch tokenwise kernel does

    @property
    def kernel(self) -> str:
        return "fused" if self.fused is not None else "tokenwise" if self.tokenwise is not None else "grouped"


def kernel_slots(active: list[int]) -> tuple[list[int], slice | None]:
    """The slots a kernel reads: the contiguous range over `active` if it pads at most a quarter, else `active`."""
    lo, hi = active[0], active[-1]
    if (hi - lo + 1) - len(active) <= len(active) // 4:
        return list(range(lo, hi + 1)), slice(lo, hi + 1)
    return active, None


def _fused_groups(token_slots: list[int], device: torch.device | str) -> FusedGroups:
    order = sorted((t for t, s in enumerate(token_slots) if s >= 0), key=token_slots.__getitem__)
    runs: list[list[int]] = []  # [slot, start, count]
    for k, t in enumerate(order):
        if runs and runs[-1][0] == token_slots[t]:
            runs[-1][2] += 1
        else:
            runs.append([token_slots[t], k, 1])
    return FusedGroups(torch.tensor(order, dtype=torch.long).to(device), torch.tensor(runs, dtype=torch.long).to(device),
                       max(run[2] for run in runs))


def _grouped_batches(token_slots: list[int], slots: list[int], device: torch.device | str) -> GroupedBatches:
    pos = {s: i for i, s in enumerate(slots)}
    groups: list[list[int]] = [[] for _ in slots]
    for t, s in enumerate(token_slots):
        if s >= 0:
            groups[pos[s]].append(t)
    tmax = max(len(g) for g in groups)
    if len(groups) * tmax == len(token_slots) and all(
            len(g) == tmax and g[0] == i * tmax and g[-1] == g[0] + tmax - 1 for i, g in enumerate(groups)):
        return GroupedBatches(None)  # every token in a run of tmax, runs in slot order: a reshape, no index
    index = torch.tensor([g + [0] * (tmax - len(g)) for g in groups], dtype=torch.long).to(device)
    if all(len(g) == tmax for g in groups):
        return GroupedBatches(index)
    rows = [i * tmax + j for i, g in enumerate(groups) for j in range(len(g))]
    targets = [t for g in groups for t in g]
    return GroupedBatches(index, torch.tensor(rows, dtype=torch.long).to(device),
                          torch.tensor(targets, dtype=torch.long).to(device))


def _token_rows(token_slots: list[int], device: torch.device | str) -> TokenRows:
    tokens = [t for t, s in enumerate(token_slots) if s >= 0]
    return TokenRows(torch.tensor(tokens, dtype=torch.long).to(device),
                     torch.tensor([token_slots[t] for t in tokens], dtype=torch.long).to(device))


def build_mapping(token_slots: list[int], dtype: torch.dtype, device: torch.device | str = "cpu",
                  kernel: str | None = None) -> LoRAMapping | None:
    """Return the mapping for one step, or None if no token uses an adapter. `kernel` forces one (tests,
    benchmarks, the tokenwise kernel of a batch-invariant engine); by default the fused kernel where it serves this
    dtype and device, else the grouped one.

    Built with Python lists and one tensor per field, not many small tensor ops: it runs on the engine thread once
    per step, for every adapter in it (benchmarks/lora_kernels.py times it; docs/benchmarks/REPORT.md, "Switching
    cost")."""
    active = sorted(set(token_slots))
    if active and active[0] < 0:
        active = active[1:]
    if not active:
        return None
    kernel = kernel or ("fused" if kernel_choice.supported(dtype, device) else "grouped")
    if kernel not in KERNELS:
        raise ValueError(f"unknown LoRA kernel {kernel!r}; one of {', '.join(KERNELS)}")
    slots, span = kernel_slots(active)
    return LoRAMapping(
        token_slots=torch.tensor(token_slots, dtype=torch.long).to(device),
        active=tuple(active),
        active_slots=torch.tensor(slots, dtype=torch.long).to(device),
        span=span,
        fused=_fused_groups(token_slots, device) if kernel == "fused" else None,
        grouped=_grouped_batches(token_slots, slots, device) if kernel == "grouped" else None,
        tokenwise=_token_rows(token_slots, device) if kernel == "tokenwise" else None,
    )
