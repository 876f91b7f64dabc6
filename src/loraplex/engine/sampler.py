"""The pure sampling functions: top-k/top-p masks and one token per row, vectorised over the batch.

Seeded requests draw their noise from their own generator, so a seed gives the same tokens
whatever other requests share the batch.
"""

from __future__ import annotations

import torch

from loraplex.sampling import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf.

    logits: [N, V] fp32; top_k: [N] long (0 = off); top_p: [N] fp32 (1 = off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first token always stays).
    before = probs.cumsum(-1) - probs
    drop |= before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Pick one token per row. logits: [N, V] fp32 (already masked for min_tokens)."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy.tolist()
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=torch.float32)
    scaled = logits / temps[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(-1)
    # Exponential-race sampling: argmax(p / E), E ~ Exp(1), picks token i with probability p_i.
    noise = torch.empty_like(probs)
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    return [int(greedy[i]) if p.greedy else int(sampled[i]) for i, p in enumerate(params)]
