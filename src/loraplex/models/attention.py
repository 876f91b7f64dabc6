"""Paged attention: write new K/V into the block cache, then attend. Where the C++ kernel (cpu_attention) is
built, the runner hands it every token of the step, prefill included, as one query (models/batch.py): it reads
that query's keys in place, in position order, so a query's bits follow from its keys alone. Without the kernel,
decode and prefill groups go through torch: gather each sequence's blocks, two matmuls (the kernel's reference);
or, where batch invariance is asked for, every token as one query again, through query_attention's torch twin of
the kernel.

Cache layout per layer: k_cache, v_cache: [num_blocks * block_size, KVH, D]; a token's slot is
block_id * block_size + offset. Gathering by block table gives every sequence its keys in order.

Stale cache rows (freed blocks, the tail of a partial block, table padding) may hold anything, NaN included: no
path does arithmetic on them. The kernel reads only positions below each context length; the torch path selects
masked scores to -inf and stale V rows to 0 (tests/test_isolation_numerics.py plants NaN there).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.models import cpu_attention
from loraplex.models.query_attention import attend_queries
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
        self.decode_kernel = False  # decode groups by cpu_attention.paged_decode (set with the caches)
        self.per_query = False  # every token is one query of the decode group (set by the model runner)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int) -> None:
        """Attend over these caches ([S, KVH, D] each); decode through the C++ kernel where it serves."""
        self.k_cache, self.v_cache, self.block_size = k_cache, v_cache, block_size
        self.decode_kernel = cpu_attention.serves(k_cache.dtype, k_cache.device, self.num_heads, self.num_kv_heads,
                                                  self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> out [T, H*D]
        self.k_cache.index_copy_(0, batch.slot_mapping, k)
        self.v_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        d = batch.decode
        if d is not None:
            if self.decode_kernel or self.per_query:  # one query per row, rows [start, start + B) of q
                rows = slice(d.start, d.start + d.num_seqs)
                attend = cpu_attention.paged_decode if self.decode_kernel else attend_queries
                attend(q[rows], self.k_cache, self.v_cache, d.block_tables, d.context_lens, self.block_size,
                       self.sliding_window, self.scale, out[rows])
            else:
                self._attend_group(q, out, d)
        if batch.prefill is not None:
            self._attend_group(q, out, batch.prefill)
        return out.view(q.shape[0], -1)

    def _attend_group(self, q: torch.Tensor, out: torch.Tensor, g: AttentionGroup) -> None:
        b, ql = g.num_seqs, g.q_len
        if g.token_index is None:
            qg = q[g.start : g.start + b * ql].view(b, ql, self.num_heads, self.head_dim)
        else:
            qg = q.index_select(0, g.token_index.view(-1)).view(b, ql, self.num_heads, self.head_dim)
        nb = g.block_tables.shape[1]
        kvh, grp, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        shape = (-1, self.block_size, kvh, d)
        # [B*NB, BS, KVH, D] -> [B, KVH, K=NB*BS, D]; index_select: one contiguous copy per block, faster than
        # advanced indexing on CPU
        blocks = g.block_tables.view(-1)
        kg = self.k_cache.view(shape).index_select(0, blocks).view(b, nb * self.block_size, kvh, d).transpose(1, 2)
        vg = self.v_cache.view(shape).index_select(0, blocks).view(b, nb * self.block_size, kvh, d).transpose(1, 2)
        # Grouped-query attention as two batched matmuls: the G query heads that share a KV head are
        # stacked as rows, [B, KVH, G*Q, D], so each KV head is read once for its G query heads; on CPU this beat
        # SDPA with a mask at decode shapes (the decode group now takes the C++ kernel where it is built). Scores
        # and softmax in fp32.
        qh = qg.permute(0, 2, 1, 3).reshape(b, kvh, grp * ql, d)
        scores = torch.matmul(qh.float(), kg.float().transpose(-1, -2)).view(b, kvh, grp, ql, -1)
        # Masked keys are selected away, not biased: a stale K row holding NaN (a freed block) gives a NaN score,
        # and NaN + bias is NaN; masked_fill replaces it whatever it holds. [B, 1, 1, Q, K] bool, True = masked.
        scores = scores.mul_(self.scale).masked_fill_(g.masks[self.sliding_window], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(b, kvh, grp * ql, -1)
        o = torch.matmul(probs, _live_values(vg, g.context_lens)).to(q.dtype)  # [B, KVH, G*Q, D]
        o = o.view(b, self.num_heads, ql, d).transpose(1, 2)  # [B, Q, H, D]
        if g.token_index is None:
            out[g.start : g.start + b * ql] = o.reshape(b * ql, self.num_heads, self.head_dim)
        else:
            assert g.valid is not None
            out[g.token_index[g.valid]] = o[g.valid]


def _live_values(vg: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """vg [B, KVH, K, D] in fp32 with the rows at positions >= each sequence's context length set to 0.

    Those rows are stale (a freed block's old values, the rest of a partial block, block-table padding): their
    probability is 0, but 0 * NaN = NaN in the matmul, so they are selected away first. Rows below the context
    length are the sequence's own keys, written before they are attended."""
    stale = torch.arange(vg.shape[2], device=vg.device)[None, :] >= context_lens[:, None]  # [B, K]
    # In place: vg is the group's gathered copy (float() copies bf16 once more), never the cache itself.
    return vg.float().masked_fill_(stale[:, None, :, None], 0.0)
