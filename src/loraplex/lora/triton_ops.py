"""Multi-LoRA kernels for CUDA in Triton (SGMV-style shrink and expand), the GPU twin of the fused CPU kernel.

Same contract as cpu_kernel.lora_add, the same slot layout (A [S, P*max_rank, IN], B compact
[S, max_rank*OUT]) and the same step metadata (tokens grouped by slot: order [N], groups [G, 3]):

    shrink:  xa[k, p*max_rank + r] = x[order[k]] . A[slot, p*max_rank + r]       (fp32 accumulate)
    expand:  out[order[k], off_p : off_(p+1)] += xa[k, p*max_rank : p*max_rank + rank] @ B_p[slot]

Each program takes one block of a group's tokens (BLOCK_M) and, for the shrink, one part's rank block,
for the expand, one part's block of output columns; it reads the slot's weights once for the block.
The reference is ops.lora_reference; tests/test_lora_triton.py runs these kernels in Triton's
interpreter (TRITON_INTERPRET=1) on the CPU against it, benchmarks/gpu.py times them on a GPU.
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

# Triton decides at definition (this import) whether the kernels run interpreted on the CPU (the tests).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 16  # tokens per program (tl.dot needs >= 16; decode groups are padded, masked)


@triton.jit
def _token_block(order_ptr, start, count, mb, rank, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Block mb of a group's tokens: positions in the group's run of `order`, their mask, the token indices,
    and the rank rows with theirs."""
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < count
    tok = tl.load(order_ptr + start + m, mask=m_ok, other=0)
    r = tl.arange(0, BLOCK_R)
    return m, m_ok, tok, r, r < rank


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, xa_ptr, order_ptr, groups_ptr, ranks_ptr,
                   IN, R_TOTAL, N_PARTS, MAX_RANK,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_F32: tl.constexpr):
    g, mb, p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(groups_ptr + 3 * g)
    start = tl.load(groups_ptr + 3 * g + 1)
    count = tl.load(groups_ptr + 3 * g + 2)
    rank = tl.load(ranks_ptr + slot * N_PARTS + p)
    if mb * BLOCK_M >= count or rank == 0:
        return
    m, m_ok, tok, r, r_ok = _token_block(order_ptr, start, count, mb, rank, BLOCK_M, BLOCK_R)
    row = p * MAX_RANK + r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < IN
        xt = tl.load(x_ptr + tok[:, None] * IN + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + (slot * R_TOTAL + row[None, :]) * IN + k[:, None],
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = A^T
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    tl.store(xa_ptr + (start + m[:, None]) * R_TOTAL + row[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])

@triton.jit
def _expand_kernel(xa_ptr, b_ptr, out_ptr, order_ptr, groups_ptr, ranks_ptr, offs_ptr,
                   OUT, R_TOTAL, N_PARTS, MAX_RANK, M_BLOCKS,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROUND_XA: tl.constexpr, DOT_F32: tl.constexpr):
    gm, p, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = gm // M_BLOCKS  # axis 0 is (group, token block): the grid has three axes only
    mb = gm % M_BLOCKS
    slot = tl.load(groups_ptr + 3 * g)
    start = tl.load(groups_ptr + 3 * g + 1)
    count = tl.load(groups_ptr + 3 * g + 2)
    rank = tl.load(ranks_ptr + slot * N_PARTS + p)
    lo = tl.load(offs_ptr + p)
    size = tl.load(offs_ptr + p + 1) - lo
    if mb * BLOCK_M >= count or rank == 0 or nb * BLOCK_N >= size:
        return
    m, m_ok, tok, r, r_ok = _token_block(order_ptr, start, count, mb, rank, BLOCK_M, BLOCK_R)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < size
    xa = tl.load(xa_ptr + (start + m[:, None]) * R_TOTAL + p * MAX_RANK + r[None, :],
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    # Part p's compact block of this slot: [MAX_RANK, size] at MAX_RANK * lo.
    bt = tl.load(b_ptr + slot * MAX_RANK * OUT + MAX_RANK * lo + r[:, None] * size + n[None, :],
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if ROUND_XA:
        xa = xa.to(bt.dtype)  # rounded to the model dtype, as a bf16/fp16 torch matmul does
    if DOT_F32:
        y = tl.dot(xa.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(xa, bt)
    o_ptr = out_ptr + tok[:, None] * OUT + lo + n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    prev = tl.load(o_ptr, mask=o_mask, other=0.0)
    tl.store(o_ptr, (prev.to(tl.float32) + y).to(prev.dtype), mask=o_mask)




def lora_add(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, groups: torch.Tensor,
             ranks: torch.Tensor, part_offsets: torch.Tensor, max_rank: int, out: torch.Tensor,
             max_group: int, widest_part: int) -> torch.Tensor:
    """out[t] += (x[t] @ A[s]^T) @ B[s] by group; shapes as cpu_kernel.lora_add. Host-side sizes of the grid,
    so nothing waits on the device: `max_group`, the most tokens in a group; `widest_part`, the widest part."""
    assert x.is_contiguous() and out.is_contiguous() and x.dtype == out.dtype == a.dtype == b.dtype
    n_groups, n_parts = groups.shape[0], ranks.shape[1]
    r_total, in_f, out_f = a.shape[1], x.shape[1], out.shape[1]
    xa = torch.empty(order.shape[0], r_total, dtype=torch.float32, device=x.device)
    m_blocks = triton.cdiv(max_group, BLOCK_M)
    block_r = triton.next_power_of_2(max(16, max_rank))  # tl.dot needs >= 16
    # fp32 data: exact fp32 dots, not TF32. Triton's CPU interpreter (the tests) multiplies bf16 wrongly,
    # so there the 16-bit operands are widened first: the same values, summed in fp32 like the GPU's dot.
    dot_f32 = x.dtype == torch.float32 or INTERPRETED
    _shrink_kernel[(n_groups, m_blocks, n_parts)](
        x, a, xa, order, groups, ranks, in_f, r_total, n_parts, max_rank,
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=64, DOT_F32=dot_f32)
    block_n = 64
    _expand_kernel[(n_groups * m_blocks, n_parts, triton.cdiv(widest_part, block_n))](
        xa, b, out, order, groups, ranks, part_offsets, out_f, r_total, n_parts, max_rank, m_blocks,
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, ROUND_XA=x.dtype != torch.float32,
        DOT_F32=dot_f32)
    return out
