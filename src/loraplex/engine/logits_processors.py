"""Per-request logits processing, vectorised over the batch: logit bias, allowed and banned tokens, then the
repetition (vLLM/transformers), frequency and presence (OpenAI) penalties.

Order, as vLLM's: bias and token masks -> repetition penalty (prompt + output tokens) -> frequency and presence
penalties (output tokens) -> temperature, min_p, top-k/top-p in sampler.py. Only rows that ask for something are
touched, and no Python loop runs over the vocabulary: each request contributes its token ids, the work is one
scatter per kind over [rows, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.sampling import SamplingParams


@dataclass(slots=True)
class RowState:
    """What one row's processing reads: its prompt (a tensor, built once per request) and output token ids, and
    its banned-word token sequences (tokenized once, at add_request)."""

    params: SamplingParams
    prompt_ids: torch.Tensor  # [P] long
    output_ids: list[int]
    bad_words: list[list[int]]


def _pairs(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token of every row, flattened: for index_put_ over [R, V]."""
    row_ix = torch.cat([torch.full((t.numel(),), i, dtype=torch.long) for i, t in enumerate(rows)])
    return row_ix.to(device), torch.cat(rows).to(device)


def _mask(rows: list[torch.Tensor], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] bool: True at each row's token ids."""
    m = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    m.index_put_(_pairs(rows, device), torch.tensor(True, device=device))
    return m


def _long(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def apply(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Process `logits` [N, V] (fp32, in place) for the rows that ask for it; returns it."""
    dev, vocab = logits.device, logits.shape[-1]
    sel = [i for i, r in enumerate(rows) if r.params.needs_logits_processing]
    if not sel:
        return logits
    bias_rows = [i for i in sel if rows[i].params.logit_bias]
    if bias_rows:
        biases = [rows[i].params.logit_bias for i in bias_rows]
        row_ix, tok_ix = _pairs([_long(list(b)) for b in biases], dev)
        row_ix = torch.tensor(bias_rows, device=dev)[row_ix]
        vals = torch.tensor([v for b in biases for v in b.values()], dtype=torch.float32, device=dev)
        logits.index_put_((row_ix, tok_ix), vals, accumulate=True)
    allow_rows = [i for i in sel if rows[i].params.allowed_token_ids is not None]
    if allow_rows:
        keep = _mask([_long(list(rows[i].params.allowed_token_ids or [])) for i in allow_rows], vocab, dev)
        idx = torch.tensor(allow_rows, device=dev)
        logits[idx] = logits[idx].masked_fill(~keep, float("-inf"))
    banned = [(i, seq[-1]) for i in sel for seq in rows[i].bad_words if _ends_with(rows[i], seq[:-1])]
    if banned:
        r, t = zip(*banned)
        logits[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] = float("-inf")
    rep_rows = [i for i in sel if rows[i].params.repetition_penalty != 1.0]
    if rep_rows:
        seen = _mask([torch.cat([rows[i].prompt_ids, _long(rows[i].output_ids)]) for i in rep_rows], vocab, dev)
        pen = torch.tensor([rows[i].params.repetition_penalty for i in rep_rows], device=dev)[:, None]
        idx = torch.tensor(rep_rows, device=dev)
        sub = logits[idx]
        penalised = torch.where(sub > 0, sub / pen, sub * pen)  # toward less likely, whatever the sign
        logits[idx] = torch.where(seen, penalised, sub)
    freq_rows = [i for i in sel if rows[i].params.frequency_penalty or rows[i].params.presence_penalty]
    if freq_rows:
        row_ix, tok_ix = _pairs([_long(rows[i].output_ids) for i in freq_rows], dev)
        counts = torch.zeros(len(freq_rows), vocab, device=dev)
        counts.index_put_((row_ix, tok_ix), torch.ones(row_ix.numel(), device=dev), accumulate=True)
        fp = torch.tensor([rows[i].params.frequency_penalty for i in freq_rows], device=dev)[:, None]
        pp = torch.tensor([rows[i].params.presence_penalty for i in freq_rows], device=dev)[:, None]
        idx = torch.tensor(freq_rows, device=dev)
        logits[idx] = logits[idx] - counts * fp - (counts > 0).float() * pp
    return logits


def _ends_with(row: RowState, prefix: list[int]) -> bool:
    """Whether the tokens so far (prompt + output) end with `prefix` (vLLM's rule for multi-token bad words)."""
    if not prefix:
        return True
    tail = row.output_ids[-len(prefix):]
    if len(tail) < len(prefix):
        need = len(prefix) - len(tail)
        if row.prompt_ids.numel() < need:
            return False
        tail = row.prompt_ids[-need:].tolist() + tail
    return tail == prefix
