"""LLMEngine: the synchronous engine. add_request / abort_request / step, nothing else drives the model.

Where a request goes: add_request validates and tokenizes -> Scheduler.waiting -> Scheduler.schedule
picks the step's tokens -> ModelRunner.execute runs the forward pass and samples -> _process appends
tokens, detokenizes, checks stop conditions -> RequestOutput.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.metrics import AdapterStats
from loraplex.adapters.peft_format import AdapterWeights, load_peft_adapter
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.slots import SlotTable
from loraplex.config import EngineConfig
from loraplex.engine import detokenizer
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.memory import MemoryPlan, available_memory, check_budgets, slot_bytes, weight_bytes
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.outputs import CompletionOutput, RequestOutput
from loraplex.engine.request import Request, RequestStatus
from loraplex.engine.scheduler import ScheduledSeq, Scheduler
from loraplex.errors import InvalidRequestError, LoraplexError, PromptTooLongError
from loraplex.hardware import cpu, resolve_dtype, warn_if_emulated
from loraplex.lora.layers import attach_lora
from loraplex.models.loader import load_model, resolve_model
from loraplex.sampling import SamplingParams

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype_choice = resolve_dtype(config.dtype, config.device)
        self.device_description = cpu().describe() if self.device.type == "cpu" else str(self.device)
        log.info("%s on %s", self.dtype_choice.describe(), self.device_description)
        warn_if_emulated(self.dtype_choice)
        self.dtype = self.dtype_choice.dtype
        self.model_dir = resolve_model(config.model)
        from loraplex.models.config import load_model_config

        mcfg = load_model_config(self.model_dir)
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, 4096)
        t0 = time.perf_counter()
        model, self.model_config = load_model(self.model_dir, self.dtype, self.max_model_len, config.quantization,
                                              config.double_quant)
        model.to(self.device)
        self.model_name = self.model_config.name
        self.memory = self._plan_memory(model)  # raises before allocating if a budget does not fit
        targets = attach_lora(model, config.max_loras, config.max_lora_rank, self.dtype) if config.enable_lora else {}
        # (layer, part) -> (in_features, out_features of that part): what an adapter must match.
        self.lora_shapes = {key: (w.in_features, dict(w.parts)[key[1]]) for key, w in targets.items()}
        num_blocks = self.memory.kv_blocks
        self.runner = ModelRunner(model, targets, num_blocks, config.block_size, self.dtype, self.device, config.seed)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.slots = SlotTable(config.max_loras)
        registry = AdapterRegistry(
            Path(config.adapter_dir) if config.adapter_dir else None,
            Path(config.registry_file) if config.registry_file else None,
        )
        self.adapters = AdapterManager(registry, self.slots, config.max_cpu_loras, self._load_adapter)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_skips, adapter_ready=self.adapters.ready)
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_dir)
        self.requests: dict[str, Request] = {}
        self._errors: list[RequestOutput] = []  # requests failed between steps, reported by the next step
        self.last_step_tokens = 0  # tokens in the latest forward pass (batch size, for metrics)
        self._ids = itertools.count()
        for name, path in config.lora_modules:
            self.register_adapter(name, path, persistent=False)
        log.info("loaded %s (%s, %s) in %.1fs: %d KV blocks of %d tokens, %d adapter slots of rank %d",
                 self.model_name, self.model_config.architecture, self.dtype, time.perf_counter() - t0,
                 num_blocks, config.block_size, config.max_loras, config.max_lora_rank)

    def _plan_memory(self, model: torch.nn.Module) -> MemoryPlan:
        c, m = self.config, self.model_config
        kv_block = m.num_layers * 2 * c.block_size * m.num_kv_heads * m.head_dim * torch.finfo(self.dtype).bits // 8
        one_slot = slot_bytes(model, c.max_lora_rank, self.dtype) if c.enable_lora else 0
        slots = c.max_loras if c.enable_lora else 0
        blocks = check_budgets(kv_budget=c.kv_cache_memory, kv_block_bytes=kv_block, block_size=c.block_size,
                               max_model_len=self.max_model_len, max_loras=slots, one_slot=one_slot,
                               adapter_budget=c.adapter_memory, free=available_memory(self.device))
        quant = c.quantization or "none"
        plan = MemoryPlan(quantization=quant + ("+double-quant" if c.double_quant else ""), weights=weight_bytes(model),
                          kv_cache=blocks * kv_block, kv_blocks=blocks, block_size=c.block_size,
                          max_model_len=self.max_model_len, adapter_slot=one_slot, adapter_slots=slots)
        log.info(plan.describe())
        return plan

    # ---- adapters -------------------------------------------------------------------------------
    def _load_adapter(self, name: str, path: Path) -> AdapterWeights:
        """Read + validate one adapter from disk (runs on the manager's loader thread)."""
        if not self.config.enable_lora:
            raise InvalidRequestError("LoRA is disabled (enable_lora=False)")
        weights = load_peft_adapter(name, path, self.lora_shapes, self.config.max_lora_rank,
                                    self.config.allow_pickle_adapters)
        if weights.base_model_name and not self._is_our_base(weights.base_model_name):
            log.warning("adapter %r was trained for %r, serving it on %r", name, weights.base_model_name, self.model_name)
        return weights

    def register_adapter(self, name: str, path: str | Path, version: str | None = None, promote: bool = True,
                         persistent: bool = True) -> str:
        """Load, validate and register a version of `name`; returns its key 'name@version'.

        Requests already running keep the version they started with; new ones get the promoted one."""
        return self.adapters.register(name, Path(path), version, promote, persistent)

    def _is_our_base(self, base: str) -> bool:
        """Whether an adapter's base_model_name_or_path names this model (a path to it, its name, or a hub id ending in it)."""
        names = {self.model_name, self.model_dir.name}
        tail = base.rstrip("/").rsplit("/", 1)[-1]
        return tail in names or Path(base).resolve() == self.model_dir.resolve()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None) -> str:
        """Validate and queue a request; raises a LoraplexError subclass naming the cause, queues nothing then."""
        sampling = sampling or SamplingParams()
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in sampling.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; the context (max_model_len) is {self.max_model_len} tokens, "
                "which must also leave room for at least one generated token"
            )
        key = self.adapters.resolve(adapter) if adapter is not None else None
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        req = Request(request_id, token_ids, sampling, key, time.monotonic(), prompt=text)
        detokenizer.init_offsets(req)
        if key is not None:
            self.adapters.acquire(key)  # starts a background load if the adapter is cold
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self._finish(req, "abort")

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self.runner.forget(req.request_id)
        self.requests.pop(req.request_id, None)
        if req.adapter is not None:
            self.adapters.release(req.adapter)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._errors)

    def step(self) -> list[RequestOutput]:
        outputs = self._between_steps()
        sched = self.scheduler.schedule()
        for slot, key in sched.slot_loads:
            t0 = time.perf_counter()
            self.runner.load_adapter(slot, self.adapters.weights(key))
            self.adapters.metrics.load("device", time.perf_counter() - t0)
        if not sched.seqs:
            if self.scheduler.has_unfinished() and self.adapters.loading:
                time.sleep(0.0005)  # only requests waiting for disk loads: don't spin the core they need
            return outputs
        self.last_step_tokens = sum(s.num_tokens for s in sched.seqs)
        sampled = self.runner.execute(sched.seqs)
        for s in sched.seqs:
            s.request.num_computed_tokens += s.num_tokens
        return outputs + [self._process(req, token) for req, token in sampled]

    def _collect_loads(self) -> dict[str, LoraplexError]:
        """Take in finished adapter loads; fail the requests waiting on one that failed (the next request retries)."""
        failures = self.adapters.poll()
        for key, error in failures.items():
            for req in [r for r in self.scheduler.waiting if r.adapter == key]:
                self._finish(req, "error")
                out = self._output(req)
                out.error = error
                self._errors.append(out)
        return failures

    def _between_steps(self) -> list[RequestOutput]:
        """Collect finished adapter loads and failed requests; place pinned adapters in device slots."""
        self._collect_loads()
        outputs, self._errors = self._errors, []
        for key in self.adapters.pinned_keys():
            if self.adapters.ready(key) and key not in self.slots.slot_of:
                grant = self.slots.acquire(key)
                if grant is not None:
                    self.runner.load_adapter(grant.slot, self.adapters.weights(key))
                    self.slots.release(key)
        return outputs

    def _process(self, req: Request, token: int) -> RequestOutput:
        req.output_token_ids.append(token)
        sp = req.sampling
        reason: str | None = None
        if token in sp.stop_token_ids:
            reason, req.stop_reason = "stop", token  # stop tokens end the text, they are not part of it
        elif not sp.ignore_eos and token in self.runner.eos_ids:
            reason = "stop"
        else:
            before = len(req.output_text)
            detokenizer.append_text(self.tokenizer, req)
            if detokenizer.find_stop(req, len(req.output_text) - before):
                reason = "stop"
        if reason is None and (len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
        return self._output(req)

    def _output(self, req: Request) -> RequestOutput:
        delta_ids = req.output_token_ids[req.emitted_token_len :]
        req.emitted_token_len = len(req.output_token_ids)
        completion = CompletionOutput(
            index=0,
            text=req.output_text,
            token_ids=list(req.output_token_ids),
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            delta_text=detokenizer.take_delta(req),
            delta_token_ids=delta_ids,
        )
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.adapter, [completion], req.finished)

    def prompt_logits(self, prompt: str | list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits [len(prompt), V] (fp32) of every prompt position under `adapter`, as one full prefill.

        Runs between steps on blocks and an adapter slot borrowed like any request's, then returns them."""
        rid = self.add_request(prompt, SamplingParams(max_tokens=1), adapter, request_id=f"logits-{next(self._ids)}")
        req = self.requests[rid]
        self.scheduler.finish(req, "abort")  # taken out of the queue: run here, outside the step loop
        self.requests.pop(rid)
        key = req.adapter
        try:
            return self._prompt_logits(req, key)
        finally:
            if key is not None:
                self.adapters.release(key)

    def _prompt_logits(self, req: Request, adapter: str | None) -> torch.Tensor:
        if adapter is not None:
            self.adapters.wait([adapter])
            failure = self._collect_loads().get(adapter)
            if failure is not None:
                raise failure
        n = len(req.prompt_token_ids)
        if not self.blocks.can_allocate(self.blocks.blocks_needed(req, n)):
            raise InvalidRequestError("the KV cache is busy; call prompt_logits when no requests are running")
        grant = self.slots.acquire(adapter) if adapter is not None else None
        if adapter is not None and grant is None:
            raise InvalidRequestError("every adapter slot is busy; call prompt_logits when no requests are running")
        try:
            if grant is not None:
                req.lora_slot = grant.slot
                if grant.needs_load:
                    self.runner.load_adapter(grant.slot, self.adapters.weights(adapter))
            self.blocks.allocate(req, n)
            return self.runner.logits(ScheduledSeq(req, n))
        finally:
            self.blocks.free(req)
            if grant is not None:
                self.slots.release(adapter)  # type: ignore[arg-type]

    def adapter_stats(self) -> AdapterStats:
        """Adapter-cache counters plus queued and running requests per adapter (by name, all versions)."""
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for reqs, counts in ((self.scheduler.waiting, queued), (self.scheduler.running, running)):
            for r in reqs:
                if r.adapter is not None:
                    name = r.adapter.partition("@")[0]
                    counts[name] = counts.get(name, 0) + 1
        return self.adapters.stats(queued, running)

    def request_status(self, request_id: str) -> RequestStatus | None:
        req = self.requests.get(request_id)
        return None if req is None else req.status
