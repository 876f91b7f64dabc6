"""ForwardBatch: the explicit per-step metadata the model runner builds and every layer reads.

Tokens of one step are flattened to [T]. Decode tokens (one per sequence) come first, then the
prefill chunks, sequence after sequence. Nothing here is global: the runner passes this object down.
Where the C++ attention kernel serves, or batch invariance is on (ModelRunner.per_query_attention), `decode` holds
every token of the step, each as its own query (block table of its sequence, context length = its position + 1),
and `prefill` is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionGroup:
    """A padded group of sequences attended together (all decodes, or all prefill chunks).

    token_index: [B, Q] index of each query in the flat token axis (padding points at a valid token)
    block_tables: [B, NB] KV block ids of each sequence (padding repeats block 0; masked out)
    masks: window -> [B, 1, 1, Q, K] bool, True where a query may not attend a key (its score is set to -inf)
           (empty for a decode group that the paged decode kernel attends: it needs only context_lens)
    context_lens: [B] long, keys each sequence attends (its last query's position + 1)
    """

    token_index: torch.Tensor | None  # None when the group's tokens are already contiguous [start, start+B)
    start: int
    num_seqs: int
    q_len: int
    block_tables: torch.Tensor
    masks: dict[int | None, torch.Tensor]
    valid: torch.Tensor | None  # [B, Q] bool; None when every query is real
    context_lens: torch.Tensor


@dataclass(slots=True)
class ForwardBatch:
    positions: torch.Tensor  # [T] absolute position of each token
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot each token's K/V is written to
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    logits_index: torch.Tensor  # [N] tokens whose logits are wanted (last token of each sampled sequence)
    # Opaque to models/: the LoRA mapping read by LoRA layer wrappers (lora.mapping.LoRAMapping).
    lora: Any = field(default=None)
