"""Rotary position embeddings with the scaling types Llama-family configs use (default, linear, llama3)."""

from __future__ import annotations

import math

import torch

from loraplex.models import cpu_fused
from loraplex.models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Semantics: inv_freq[i] = theta^(-2i/d), then rescaled per `rope.rope_type`. Shape [head_dim // 2], fp32."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        # Low frequencies (long wavelengths) are divided by `factor`, high ones kept, the band between blended.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin table indexed by absolute position; applied in the half-rotation (NeoX/HF) layout."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv = inv_frequencies(rope, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def reference(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, KVH, D]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the packed qkv [T, (H + 2 KVH) D] and rotate: q [T, H, D], k [T, KVH, D] (both contiguous), v."""
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        v = qkv[:, q_size + kv_size : q_size + 2 * kv_size].view(-1, kv_heads, head_dim)
        if cpu_fused.supported(qkv):  # one call instead of ~12 small ops (on CPU)
            q, k = cpu_fused.rope(qkv, heads, kv_heads, head_dim, positions, self.cos, self.sin)
            return q, k, v
        q = qkv[:, :q_size].view(-1, heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, kv_heads, head_dim)
        q, k = self.reference(positions, q, k)
        return q, k, v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
