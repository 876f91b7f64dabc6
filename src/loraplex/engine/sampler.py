"""The pure sampling functions: temperature, min_p, top-k/top-p masks and one token per row, vectorised over the
batch, with the log-probabilities a request asks for.

Seeded requests draw their noise from their own generator, so a seed gives the same tokens
whatever other requests share the batch.
"""

from __future__ import annotations

import torch

from loraplex.sampling import SamplingParams, TokenLogprobs


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


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p [N] times the row's most likely token's (0 = off)."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))


def _scaled(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits / temperature per row (greedy rows at temperature 1)."""
    if all(p.greedy for p in params):
        return logits
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=torch.float32)
    return logits / temps[:, None].to(logits.device)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Pick one token per row. logits: [N, V] fp32, already processed (min_tokens, bias, masks, penalties)."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy.tolist()
    scaled = _scaled(logits, params)
    if any(p.min_p > 0 for p in params):
        scaled = apply_min_p(scaled, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=scaled.device))
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


def logprobs_of(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprobs | None]:
    """For the rows that ask (`logprobs`): the chosen token's log-probability and the top ones, from the same
    processed logits `sample` drew from."""
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not want:
        return out
    lp = _scaled(logits[want], [params[i] for i in want]).log_softmax(-1)
    k = max(params[i].logprobs or 0 for i in want)
    top_v, top_i = lp.topk(k, dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=lp.device)[:, None])[:, 0].tolist()
    top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
    for row, i in enumerate(want):
        n = params[i].logprobs or 0
        out[i] = TokenLogprobs(chosen[row], list(zip(top_i_l[row][:n], top_v_l[row][:n])))
    return out
