"""Per-query paged attention in torch, in a summation order fixed by each query's own keys: the batch-invariant
torch twin of the C++ kernel (cpu_attention.paged_decode, same signature and semantics), serving where that kernel
is not built and batch invariance is asked for (issue 41).

Semantics:
    out[t] = softmax(q[t] K_t^T * scale) V_t over the keys at positions [max(0, ctx_t - window), ctx_t) of query t's
    sequence (its block table), computed in fp32 and rounded once to q's dtype.
Shapes:
    q, out: [T, H, D]    k_cache, v_cache: [S, KVH, D]    block_tables: [T, NB] long    context_lens: [T] long

Why a row's bits follow from that row alone, whatever T and NB (the longest table in the step) are:
- the products of a score, q . k over D, and of an output, p . v over one block's keys, are summed over an inner
  dimension of fixed length (D; block_size), one row per output, by the same vectorised loop whatever the number of
  rows;
- the softmax runs over each query's row of NB * block_size scores: its lanes hold key i in lane i mod width, so
  the keys past the query's own blocks (-inf, probability exactly 0) only add zeros to its sums; the exponent is
  the same vector function for every element of a row (an elementwise torch.exp would take the scalar libm one for a
  tail whose place depends on T);
- the blocks' outputs are added in block order, and a block past the query's context adds exactly 0.
Every block is one fixed-shape step, so a chunked prefill's split and a cached prefix change no bit either.
tests/test_batch_invariance.py runs the engine on this path; tests/test_query_attention.py holds it to the reference.
"""

from __future__ import annotations

import torch

MIN_KEYS = 64  # a softmax row at least this long: below the vector width the sum takes another path


def attend_queries(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, block_size: int, window: int | None, scale: float,
                   out: torch.Tensor) -> None:
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh  # query heads per KV head, as transformers' repeat_kv lays them out
    nb = max(block_tables.shape[1], -(-MIN_KEYS // block_size))
    qf = q.float().view(t, kvh, g, 1, d)
    offsets = torch.arange(block_size, device=q.device)
    scores = torch.empty(t, kvh, g, nb * block_size, device=q.device)
    allowed = torch.empty(t, nb * block_size, dtype=torch.bool, device=q.device)
    rows = []
    for j in range(nb):
        table = block_tables[:, j] if j < block_tables.shape[1] else torch.zeros_like(context_lens)
        slots = (table[:, None] * block_size + offsets).view(-1)  # [T * BS]
        pos = j * block_size + offsets  # [BS]
        ok = pos < context_lens[:, None]  # [T, BS]: the query's causal keys; stale rows and padding are not
        if window is not None:
            ok &= pos > context_lens[:, None] - 1 - window
        allowed[:, j * block_size:(j + 1) * block_size] = ok
        k = k_cache.index_select(0, slots).view(t, block_size, kvh, d).permute(0, 2, 1, 3).float()  # [T, KVH, BS, D]
        # [T, KVH, G, BS, D] summed over D; a stale K row (NaN) gives a NaN score, replaced below
        scores[..., j * block_size:(j + 1) * block_size] = (qf * k[:, :, None]).sum(-1)
        rows.append(slots)
    scores.mul_(scale).masked_fill_(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [T, KVH, G, NB * BS]; every query allows its own key: no row all -inf
    acc = torch.zeros(t, kvh, g, d, device=q.device)
    for j, slots in enumerate(rows):
        cols = slice(j * block_size, (j + 1) * block_size)
        # V as [T, KVH, 1, D, BS], stale rows 0 (their probability is 0, but 0 * NaN is NaN)
        v = v_cache.index_select(0, slots).view(t, block_size, kvh, d).float()
        v = v.masked_fill_(~allowed[:, cols, None, None], 0.0).permute(0, 2, 3, 1).contiguous()[:, :, None]
        acc += (probs[..., None, cols] * v).sum(-1)  # [T, KVH, G, D, BS] summed over the block's keys
    out.copy_(acc.view(t, h, d))
