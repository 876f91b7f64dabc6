"""Paged attention in plain torch: write new K/V into the block cache, gather each sequence's blocks, SDPA.

Cache layout per layer: k_cache, v_cache: [num_blocks * block_size, KVH, D]; a token's slot is
block_id * block_size + offset. Gathering by block table gives every sequence its keys in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.batch import AttentionGroup, ForwardBatch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5
        # Bound by the model runner when the KV cache is allocated: [S, KVH, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.block_size = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> out [T, H*D]
        self.k_cache.index_copy_(0, batch.slot_mapping, k)
        self.v_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        for group in (batch.decode, batch.prefill):
            if group is not None:
                self._attend_group(q, out, group)
        return out.view(q.shape[0], -1)

    def _attend_group(self, q: torch.Tensor, out: torch.Tensor, g: AttentionGroup) -> None:
        b, ql = g.num_seqs, g.q_len
        if g.token_index is None:
            qg = q[g.start : g.start + b * ql].view(b, ql, self.num_heads, self.head_dim)
        else:
            qg = q[g.token_index]  # [B, Q, H, D]
        nb = g.block_tables.shape[1]
        shape = (-1, self.block_size, self.num_kv_heads, self.head_dim)
        # [B, NB, BS, KVH, D] -> [B, KVH, NB*BS, D]
        kg = self.k_cache.view(shape)[g.block_tables].view(b, nb * self.block_size, self.num_kv_heads, self.head_dim)
        vg = self.v_cache.view(shape)[g.block_tables].view(b, nb * self.block_size, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            kg.transpose(1, 2),
            vg.transpose(1, 2),
            attn_mask=g.masks[self.sliding_window],
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)  # [B, Q, H, D]
        if g.token_index is None:
            out[g.start : g.start + b * ql] = o.reshape(b * ql, self.num_heads, self.head_dim)
        else:
            assert g.valid is not None
            out[g.token_index[g.valid]] = o[g.valid]
