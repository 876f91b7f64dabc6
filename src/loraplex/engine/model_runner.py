"""ModelRunner: owns the model, its KV cache and adapter slots; turns a scheduled step into tensors,
runs the forward pass and samples.

Tokens are laid out decodes first (one per sequence), then prefill chunks, so the decode group is
contiguous and needs no gather.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from loraplex.adapters.peft_format import AdapterWeights
from loraplex.engine.request import Request
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.lora import kernel_choice
from loraplex.lora.layers import LoRALinear, PartWeights
from loraplex.lora.mapping import build_mapping
from loraplex.models.batch import AttentionGroup, ForwardBatch
from loraplex.models.llama import LlamaForCausalLM
from loraplex.engine import logits_processors
from loraplex.engine.sampler import logprobs_of, sample
from loraplex.engine.structured import StructuredOutputs, apply_bitmask
from loraplex.errors import NonFiniteOutputError
from loraplex.sampling import TokenLogprobs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    """One forward pass's outcome: sampled tokens, and the requests that failed alone (with their error)."""

    sampled: list[tuple[Request, int, TokenLogprobs | None]]
    failed: list[tuple[Request, Exception]] = field(default_factory=list)


def _nonfinite_error(req: Request) -> NonFiniteOutputError:
    who = "the base model" if req.adapter is None else f"adapter {str(req.adapter)!r}"
    return NonFiniteOutputError(
        f"{who} produced non-finite activations (NaN or infinity) for request {req.request_id}: its weights overflow "
        "on this input; no output can be computed. Other requests are not affected")


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, lora_targets: dict[tuple[int, str], LoRALinear],
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device, seed: int,
                 structured: StructuredOutputs, batch_invariant: bool = False) -> None:
        self.structured = structured
        self.model = model
        self.lora_targets = lora_targets
        self.wrappers = list(dict.fromkeys(lora_targets.values()))
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        cfg = model.cfg
        self.eos_ids = list(cfg.eos_token_ids)
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)  # allocated once, never resized
        for i, attn in enumerate(model.attention_modules()):
            attn.bind_cache(self.kv_cache[i, 0], self.kv_cache[i, 1], block_size)
        self.windows = {attn.sliding_window for attn in model.attention_modules()}
        # Where the C++ kernel serves every layer, every query, a prompt's as a decode's, is one of its rows, attended
        # over its own keys in position order: its bits follow from its keys alone (not from the step's shape, where
        # a chunked prefill split the prompt, or whether its prefix came from the cache), and prefill is faster than
        # the torch matmuls (docs/benchmarks/README.md, "Figures behind design choices").
        # Elsewhere decode and prefill groups go through torch's matmuls, with masks; or, batch-invariant, every query
        # through the kernel's torch twin (models/query_attention.py), slower than the matmuls but in a fixed order.
        self.per_query_attention = batch_invariant or all(attn.decode_kernel for attn in model.attention_modules())
        for attn in model.attention_modules():
            attn.per_query = self.per_query_attention
        # LoRA: the fused kernel where it runs (per token already); else, batch-invariant, the tokenwise torch kernel.
        self.lora_kernel = "tokenwise" if batch_invariant and not kernel_choice.supported(dtype, device) else None
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_ids: dict[str, torch.Tensor] = {}  # prompts of requests with penalties, built once
        self._seed_source = torch.Generator().manual_seed(seed)

    # ---- adapters -------------------------------------------------------------------------------
    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into device slot `slot` of every wrapper (wrappers it doesn't target are zeroed)."""
        per_wrapper: dict[LoRALinear, dict[str, PartWeights]] = {w: {} for w in self.wrappers}
        for (layer, part), w in weights.parts.items():
            per_wrapper[self.lora_targets[(layer, part)]][part] = w
        with torch.no_grad():
            for wrapper, parts in per_wrapper.items():
                wrapper.set_slot(slot, parts)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq]) -> StepResult:
        """Run one forward pass; return (request, sampled token, its log-probabilities if asked) for every request
        that reached its last token, and the requests that failed alone (non-finite logits, a grammar that
        refused the token). An exception from the batched work itself propagates (LLMEngine bisects the batch).
        Safe to re-run on part of the batch: K/V writes repeat the same values, prompt logprobs are kept once."""
        ids, batch, sampled_reqs, prompt_rows = self._prepare(seqs, all_logits=False)
        constrained = [i for i, r in enumerate(sampled_reqs) if r.matcher is not None]
        masks = self.structured.start_masks([sampled_reqs[i].matcher for i in constrained]) if constrained else None
        logits = self.model(ids, batch)  # the grammar masks are computed meanwhile, on the worker thread
        poisoned = self._nonfinite(logits, [r for r, _ in prompt_rows] + sampled_reqs)
        failed: list[tuple[Request, Exception]] = [(r, _nonfinite_error(r)) for r in poisoned.values()]
        if prompt_rows:
            keep = [i for i, (r, _) in enumerate(prompt_rows) if id(r) not in poisoned]
            if keep:
                self._prompt_logprobs(logits[keep], [prompt_rows[i] for i in keep])
            logits = logits[len(prompt_rows):]
        if not sampled_reqs:
            return StepResult([], failed)
        if masks is not None:
            apply_bitmask(logits, constrained, masks.result())
        tokens, logprobs = self._sample(logits, sampled_reqs)
        for i in constrained:
            if id(sampled_reqs[i]) in poisoned:
                continue
            try:
                sampled_reqs[i].matcher.consume_token(tokens[i])
            except Exception as e:  # this request's grammar state only
                log.exception("request %s: the grammar matcher failed", sampled_reqs[i].request_id)
                failed.append((sampled_reqs[i], e))
        gone = {id(r) for r, _ in failed}
        return StepResult([t for t in zip(sampled_reqs, tokens, logprobs) if id(t[0]) not in gone], failed)

    def _nonfinite(self, logits: torch.Tensor, row_reqs: list[Request]) -> dict[int, Request]:
        """The requests owning a logits row with NaN or inf (one isfinite over [N, V] and one sync per step).
        Their rows are set to 0 so that nothing downstream (bitmask, penalties, sampling) sees a NaN; rows are
        independent, so the other requests' tokens are the same as without them."""
        bad_rows = (~torch.isfinite(logits).all(-1)).nonzero()[:, 0].tolist()
        if not bad_rows:
            return {}
        logits[bad_rows] = 0.0
        return {id(row_reqs[i]): row_reqs[i] for i in bad_rows}  # by identity: Request compares by value

    @torch.inference_mode()
    def logits(self, seq: ScheduledSeq) -> torch.Tensor:
        """Logits [num_tokens, V] (fp32) at every position computed for one sequence, sampling nothing."""
        ids, batch, _, _ = self._prepare([seq], all_logits=True)
        return self.model(ids, batch)

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[tuple[Request, int]]) -> None:
        """Log-probabilities of prompt tokens (vLLM's prompt_logprobs): row i's logits at position p score the
        prompt token at p + 1; appended to each request's prompt_logprobs, in order."""
        lp = logits.log_softmax(-1)
        nxt = torch.tensor([r.prompt_token_ids[p + 1] for r, p in rows], device=lp.device)
        chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
        k = max(r.sampling.prompt_logprobs or 0 for r, _ in rows)
        top_v, top_i = (t.tolist() for t in lp.topk(k, dim=-1)) if k else ([[]] * len(rows), [[]] * len(rows))
        for (r, p), c, tv, ti in zip(rows, chosen, top_v, top_i):
            if p == len(r.prompt_logprobs):  # a preempted request recomputes its prompt: scored once
                n = r.sampling.prompt_logprobs or 0
                r.prompt_logprobs.append(TokenLogprobs(c, list(zip(ti[:n], tv[:n]))))

    def _prepare(self, seqs: list[ScheduledSeq], all_logits: bool
                 ) -> tuple[torch.Tensor, ForwardBatch, list[Request], list[tuple[Request, int]]]:
        # Decode tokens sorted by adapter slot: equal-size runs let the grouped LoRA kernel read the
        # activations as a view, with no gather or scatter (lora/mapping.py). Order within a step is free.
        decodes = sorted((s for s in seqs if s.num_tokens == 1), key=lambda s: s.request.lora_slot)
        prefills = [s for s in seqs if s.num_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lora_slots: list[int] = []
        sample_at: list[int] = []
        sampled_reqs: list[Request] = []
        prompt_at: list[int] = []  # rows whose logits score the next prompt token (prompt_logprobs)
        prompt_rows: list[tuple[Request, int]] = []
        bs = self.block_size
        for s in decodes + prefills:
            r = s.request
            start = r.num_computed_tokens
            scored = r.sampling.prompt_logprobs is not None and not all_logits
            for p in range(start, start + s.num_tokens):
                if scored and p < len(r.prompt_token_ids) - 1:
                    prompt_at.append(len(ids))
                    prompt_rows.append((r, p))
                ids.append(r.token_at(p))
                positions.append(p)
                slots.append(r.block_ids[p // bs] * bs + p % bs)
            lora_slots.extend([r.lora_slot] * s.num_tokens)
            if start + s.num_tokens == r.num_tokens:
                sample_at.append(len(ids) - 1)
                sampled_reqs.append(r)
        dev = self.device
        if self.per_query_attention:
            decode, prefill = self._queries(decodes + prefills, positions), None
        else:
            decode = self._group(decodes, 0) if decodes else None
            prefill = self._group(prefills, len(decodes)) if prefills else None
        batch = ForwardBatch(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode=decode,
            prefill=prefill,
            logits_index=torch.arange(len(ids), device=dev) if all_logits
            else torch.tensor(prompt_at + sample_at, dtype=torch.long, device=dev),
            lora=build_mapping(lora_slots, self.dtype, dev, self.lora_kernel),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), batch, sampled_reqs, prompt_rows

    def _queries(self, seqs: list[ScheduledSeq], positions: list[int]) -> AttentionGroup:
        """Every token of the step as one query of the decode kernel, rows [0, T): its sequence's block table
        [T, NB] and context length position + 1 (its causal keys; the step's K/V are written before attending)."""
        nb = max(len(s.request.block_ids) for s in seqs)
        tables = torch.tensor([s.request.block_ids + [0] * (nb - len(s.request.block_ids)) for s in seqs],
                              dtype=torch.long).repeat_interleave(torch.tensor([s.num_tokens for s in seqs]), dim=0)
        return AttentionGroup(token_index=None, start=0, num_seqs=len(positions), q_len=1,
                              block_tables=tables.to(self.device), masks={}, valid=None,
                              context_lens=(torch.tensor(positions, dtype=torch.long) + 1).to(self.device))

    def _group(self, seqs: list[ScheduledSeq], start: int) -> AttentionGroup:
        """The sequences' tokens from row `start` as one padded group for the torch attention path."""
        bs = self.block_size
        b = len(seqs)
        q_lens = [s.num_tokens for s in seqs]
        q = max(q_lens)
        nb = max(len(s.request.block_ids) for s in seqs)
        context_lens = torch.tensor([s.request.num_computed_tokens + s.num_tokens for s in seqs], dtype=torch.long)
        tables = torch.zeros(b, nb, dtype=torch.long)
        qpos = torch.zeros(b, q, dtype=torch.long)
        token_index = torch.zeros(b, q, dtype=torch.long)
        offset = start
        for i, s in enumerate(seqs):
            tables[i, : len(s.request.block_ids)] = torch.tensor(s.request.block_ids)
            first = s.request.num_computed_tokens
            qpos[i, : s.num_tokens] = torch.arange(first, first + s.num_tokens)
            token_index[i, : s.num_tokens] = torch.arange(offset, offset + s.num_tokens)
            offset += s.num_tokens
        uniform = all(n == q for n in q_lens)
        valid = torch.arange(q)[None, :] < torch.tensor(q_lens)[:, None]  # [B, Q]
        kpos = torch.arange(nb * bs)
        masked: dict[int | None, torch.Tensor] = {}
        for w in self.windows:
            m = kpos[None, None, :] <= qpos[:, :, None]  # causal over absolute positions: [B, Q, K]
            if w is not None:
                m &= kpos[None, None, :] > qpos[:, :, None] - w
            # True where a query may not attend a key (each query sees at least itself, so no row is all masked)
            masked[w] = (~m)[:, None, None].to(self.device)  # [B, 1, 1, Q, K]
        return AttentionGroup(
            token_index=None if uniform else token_index.to(self.device),
            start=start,
            num_seqs=b,
            q_len=q,
            block_tables=tables.to(self.device),
            masks=masked,
            valid=None if uniform else valid.to(self.device),
            context_lens=context_lens.to(self.device),
        )

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        for i, r in enumerate(reqs):
            if len(r.output_token_ids) < r.sampling.min_tokens:
                banned = r.sampling.stop_token_ids + ([] if r.sampling.ignore_eos else self.eos_ids)
                if banned:
                    logits[i, banned] = float("-inf")
        params = [r.sampling for r in reqs]
        if any(p.needs_logits_processing for p in params):
            logits_processors.apply(logits, [self._row(r) for r in reqs])
        tokens = sample(logits, params, [self._generator(r) for r in reqs])
        return tokens, logprobs_of(logits, params, tokens)

    def _row(self, r: Request) -> logits_processors.RowState:
        prompt = self.prompt_ids.get(r.request_id)
        if prompt is None and r.sampling.needs_logits_processing:
            prompt = self.prompt_ids[r.request_id] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        return logits_processors.RowState(r.sampling, prompt if prompt is not None else torch.empty(0, dtype=torch.long),
                                          r.output_token_ids, r.bad_words_ids)

    def _generator(self, r: Request) -> torch.Generator | None:
        if r.sampling.greedy:
            return None
        g = self.generators.get(r.request_id)
        if g is None:
            seed = r.sampling.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            g = self.generators[r.request_id] = torch.Generator().manual_seed(seed)
        return g

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.prompt_ids.pop(request_id, None)
