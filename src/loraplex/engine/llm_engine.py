"""LLMEngine: the synchronous engine. add_request / abort_request / step, nothing else drives the model. It owns
the step, the scheduler, the runner and the facts; preparing a request, turning tokens into outputs and adapter
state are each one module's job.

Where a request goes: Preparer.prepare (engine/prepare.py) validates, tokenizes and makes its grammar matcher (any
thread), admit queues it (the stepping thread; add_request does both) -> Scheduler.waiting -> Scheduler.schedule
picks the step's tokens (KV blocks, and adapter slots through the AdapterManager) -> ModelRunner.execute runs the
forward pass and samples -> output_processor.append_token adds each token, detokenizes, checks stop conditions ->
RequestOutput. Every registration, slot and reference goes through `self.adapters` (adapters.manager.AdapterManager),
the one owner of adapter state; administration arrives as engine/admin.py's operations.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraplex.adapters.key import AdapterKey, AdapterTarget, parse_target, validate_name
from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.metrics import AdapterStats
from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.residency import HostAdmission, admit_all
from loraplex.config import EngineConfig
from loraplex.engine import detokenizer
from loraplex.engine.admin import AdminOp
from loraplex.engine.facts import EngineFacts
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.chat_template import use_chat_template
from loraplex.engine.build import build_model
from loraplex.engine.model_runner import ModelRunner, StepResult
from loraplex.engine.prepare import PreparedRequest, Preparer
from loraplex.engine.output_processor import append_token, request_output
from loraplex.engine.outputs import EngineSnapshot, EngineStats, PrefixCacheSnapshot, RequestOutput
from loraplex.engine.request import Request, Share
from loraplex.engine.scheduler import ScheduledSeq, Scheduler
from loraplex.engine.step_log import StepLog
from loraplex.engine.structured import StructuredOutputs
from loraplex.errors import InvalidRequestError, LoraplexError, NonFiniteOutputError
from loraplex.sampling import SamplingParams, TokenLogprobs

log = logging.getLogger(__name__)
R = TypeVar("R")


class LLMEngine:
    def __init__(self, config: EngineConfig, host_admission: HostAdmission = admit_all) -> None:
        """`host_admission`: which loaded adapters the host tier caches after their requests (adapters/residency.py;
        a cluster replica's claims); every one by default."""
        self.config = config
        built = build_model(config)  # dtype -> weights -> quantize -> device -> prepack -> memory plan -> LoRA
        self.model_config = built.config  # the architecture (vocab, layers, EOS ids); what it serves: self.facts
        self.facts = facts = EngineFacts(built.config.name, built.model_dir, built.max_model_len, config.block_size,
                                         config.max_num_seqs, built.dtype.name, built.dtype.describe(),
                                         built.device_description, built.memory, config.max_prepare_seconds,
                                         tuple(built.config.eos_token_ids), built.batch_invariance)
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(facts.model_dir)
        if config.chat_template is not None:
            use_chat_template(self.tokenizer, config.chat_template)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, list(self.model_config.eos_token_ids))
        self.preparer = Preparer(self.tokenizer, self.model_config.vocab_size, facts.max_model_len, self.structured)
        self.runner = ModelRunner(built.model, built.lora_targets, facts.memory.kv_blocks, config.block_size,
                                  built.dtype.dtype, built.device, config.seed, self.structured,
                                  built.batch_invariance.enabled)
        self.blocks = BlockManager(facts.memory.kv_blocks, config.block_size, config.enable_prefix_caching)
        registry = AdapterRegistry(
            Path(config.adapter_dir) if config.adapter_dir else None,
            Path(config.registry_file) if config.registry_file else None,
        )
        loader = AdapterLoader(built.lora_shapes, config.max_lora_rank, config.allow_pickle_adapters, facts.model_name,
                               facts.model_dir, config.enable_lora)
        self.adapters = AdapterManager(registry, config.max_loras, config.max_cpu_loras, loader, host_admission)
        fair_steps = config.fair_steps == "on" or (config.fair_steps == "auto" and built.device.type == "cpu")
        self.scheduler = Scheduler(self.blocks, self.adapters, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_skips, fair_steps)
        self.requests: dict[str, Request] = {}
        self._errors: list[RequestOutput] = []  # requests failed between steps, reported by the next step
        self.nonfinite_requests: dict[str, int] = {}  # model label -> requests ended by NonFiniteOutputError
        self.last_step_tokens = 0  # tokens in the latest forward pass (batch size, for metrics)
        self.step_log = StepLog(facts.model_name)  # the last steps' batch composition, for the dashboard
        self._ids = itertools.count()
        # Start-up modules never undo an admin's promotion or unload (adapters/startup.py says the rules).
        self.adapters.register_startup([(validate_name(name), Path(path)) for name, path in config.lora_modules])
        log.info("%d KV blocks of %d tokens, %d adapter slots of rank %d", facts.memory.kv_blocks, config.block_size,
                 config.max_loras, config.max_lora_rank)

    # ---- adapters: state owned by self.adapters; administration as engine/admin.py's operations ------
    def admin(self, op: AdminOp[R]) -> R:
        """Apply one administration operation (engine/admin.py: the admin routes' and a cluster replica's) in the
        caller's thread; the manager's lock orders it against the stepping thread. A registration reads the disk
        here."""
        return op.run(self.adapters)

    # ---- requests -------------------------------------------------------------------------------
    def _adapter(self, target: AdapterTarget) -> AdapterKey | None:
        """The version a request for `target` runs on now (None: the base model)."""
        return None if target is None else self.adapters.resolve(target)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | AdapterTarget = None, request_id: str | None = None,
                    cache_salt: str | None = None, share: Share | None = None) -> str:
        """Validate and queue a request; raises a LoraplexError subclass naming the cause, queues nothing then.
        `adapter`: "name" or "name@version" (parsed here, once), a spec or key, or None for the base model.
        Requests with a `cache_salt` share cached prompt blocks only with requests of the same salt (and adapter).
        prepare + admit in the caller's thread; AsyncLLMEngine runs prepare on a worker, admit on the engine thread."""
        prepared = self.preparer.prepare(prompt, sampling, parse_target(adapter), cache_salt)
        return self.admit(prepared, request_id, share)

    def admit(self, prepared: PreparedRequest, request_id: str | None = None, share: Share | None = None) -> str:
        """Queue a prepared request (on the thread that steps). Its adapter version is resolved now, so a promotion
        that landed while it was prepared applies. `share`: its tenant, weight and priority (engine/fair_share.py)."""
        key = self._adapter(prepared.adapter)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        share = share or Share()
        if not (isinstance(share.weight, (int, float)) and 0 < share.weight < float("inf")):
            raise InvalidRequestError(f"a tenant's weight must be a positive number, got {share.weight!r}")
        # Without a tenant of its own (offline: the server always names one), a request's tenant is its adapter's
        # name, the base model being one tenant (tagged, so that no adapter name can be a given tenant's).
        tenant = ("tenant", share.tenant) if share.tenant is not None else ("adapter", None if key is None else key.name)
        req = Request(request_id, prepared.prompt_token_ids, prepared.sampling, key, time.monotonic(),
                      prompt=prepared.prompt, tenant=tenant, weight=float(share.weight), priority=share.priority,
                      cache_salt=prepared.cache_salt, bad_words_ids=prepared.bad_words_ids, matcher=prepared.matcher)
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

    def _finish(self, req: Request, reason: str, keep_cached: bool = True) -> None:
        self.scheduler.finish(req, reason, keep_cached)
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
        t0 = time.perf_counter()
        result = self._execute(sched.seqs)
        self.last_step_tokens = self.step_log.record(sched.seqs, time.perf_counter() - t0,
                                                     self.blocks.num_blocks - self.blocks.num_free,
                                                     len(self.scheduler.waiting))
        failed = {id(req) for req, _ in result.failed}
        self.scheduler.advance([s for s in sched.seqs if id(s.request) not in failed])
        outputs += [self._fail(req, error) for req, error in result.failed]
        for req, token, lp in result.sampled:
            try:
                outputs.append(self._process(req, token, lp))
            except Exception as e:  # a bug in one request's detokenizing or stop checks: that request alone
                log.exception("request %s: processing its token failed", req.request_id)
                outputs.append(self._fail(req, e))
        return outputs

    def _execute(self, seqs: list[ScheduledSeq]) -> StepResult:
        """runner.execute; if the batched work raises, the batch is bisected and each half re-run, so that only the
        requests that fail alone get the error (log2(batch) extra passes per failing request). Re-running is
        safe: the scheduler has not advanced, and K/V writes for the same positions repeat the same values."""
        try:
            return self.runner.execute(seqs)
        except Exception as e:
            if len(seqs) == 1:
                log.exception("request %s failed alone in a step", seqs[0].request.request_id)
                return StepResult([], [(seqs[0].request, e)])
            log.warning("a step of %d sequences failed (%s: %s); re-running it in halves", len(seqs),
                        type(e).__name__, e)
        mid = len(seqs) // 2
        first, second = self._execute(seqs[:mid]), self._execute(seqs[mid:])
        return StepResult(first.sampled + second.sampled, first.failed + second.failed)

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        """End a request that failed in a step with `error`: its K/V blocks (maybe NaN) never enter the prefix
        cache; non-finite activations are counted per model (/metrics loraplex_nonfinite_requests_total)."""
        if isinstance(error, NonFiniteOutputError):
            label = self.facts.model_name if req.adapter is None else req.adapter.name
            self.nonfinite_requests[label] = self.nonfinite_requests.get(label, 0) + 1
            log.warning("%s", error)
        if not req.finished:
            self._finish(req, "error", keep_cached=False)
        out = request_output(req)
        out.error = error
        return out

    def _collect_loads(self) -> dict[AdapterKey, LoraplexError]:
        """Take in finished adapter loads; fail the requests waiting on one that failed (the next request retries)."""
        failures = self.adapters.poll()
        for key, error in failures.items():
            for req in [r for r in self.scheduler.waiting if r.adapter == key]:
                self._finish(req, "error")
                out = request_output(req)
                out.error = error
                self._errors.append(out)
        return failures

    def _between_steps(self) -> list[RequestOutput]:
        """Collect finished adapter loads and failed requests; place pinned adapters in device slots."""
        self._collect_loads()
        outputs, self._errors = self._errors, []
        for slot, key in self.adapters.place_pinned():
            self.runner.load_adapter(slot, self.adapters.weights(key))
        return outputs

    def _process(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        reason = append_token(req, token, logprobs, self.tokenizer, self.runner.eos_ids, self.facts.max_model_len)
        if reason is not None:
            self._finish(req, reason)
        return request_output(req)

    def prompt_logits(self, prompt: str | list[int], adapter: str | AdapterTarget = None) -> torch.Tensor:
        """Logits [len(prompt), V] (fp32) at every prompt position under `adapter`: one prefill outside the step
        loop (tests, evaluation), on KV blocks and an adapter slot borrowed as a request's would be."""
        _, token_ids = self.preparer.tokens(prompt)
        key = self._adapter(parse_target(adapter))
        req = Request(f"logits-{next(self._ids)}", token_ids, SamplingParams(max_tokens=1), key, time.monotonic())
        n = len(token_ids)
        if not self.blocks.can_allocate(self.blocks.blocks_needed(req, n)):
            raise InvalidRequestError("the KV cache is busy; call prompt_logits when no requests are running")
        if key is None:
            return self._logits(req, n)
        with self.adapters.borrow(key) as grant:  # referenced, loaded and in a slot, as a request's would be
            if grant.needs_load:
                self.runner.load_adapter(grant.slot, self.adapters.weights(key))
            req.lora_slot = grant.slot
            return self._logits(req, n)

    def _logits(self, req: Request, n: int) -> torch.Tensor:
        self.blocks.allocate(req, n)
        try:
            return self.runner.logits(ScheduledSeq(req, n))
        finally:
            self.blocks.free(req)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block (requests running keep theirs); returns how many blocks were cached."""
        return self.scheduler.reset_prefix_cache()

    def snapshot(self) -> EngineSnapshot:
        """The engine's state between two steps (call it on the thread that steps)."""
        pc = self.scheduler.prefix_cache
        prefix = PrefixCacheSnapshot(
            enabled=self.blocks.caching, cached_blocks=self.blocks.num_cached, evictions=self.blocks.evictions,
            queries={self._label(k): v for k, v in pc.queries.items()},
            hits={self._label(k): v for k, v in pc.hits.items()})
        return EngineSnapshot(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                              last_step_tokens=self.last_step_tokens, kv_blocks_free=self.blocks.num_free,
                              kv_blocks_total=self.blocks.num_blocks, adapters=self.adapter_stats(),
                              prefix_cache=prefix, nonfinite_requests=dict(self.nonfinite_requests))

    def stats(self) -> EngineStats:
        """The dashboard's view: the snapshot, the adapter tiers, the last steps, requests per model (call it on
        the thread that steps)."""
        snap = self.snapshot()
        base = self.facts.model_name
        queued = {base: len(self.scheduler.waiting) - sum(snap.adapters.queued.values()), **snap.adapters.queued}
        running = {base: len(self.scheduler.running) - sum(snap.adapters.running.values()), **snap.adapters.running}
        return EngineStats(snap, self.adapters.tiers(), self.step_log.history(), queued, running)

    def _label(self, adapter: str | None) -> str:
        return self.facts.model_name if adapter is None else adapter

    def adapter_stats(self) -> AdapterStats:
        """Adapter-cache counters plus queued and running requests per adapter (by name, all versions)."""
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for reqs, counts in ((self.scheduler.waiting, queued), (self.scheduler.running, running)):
            for r in reqs:
                if r.adapter is not None:
                    counts[r.adapter.name] = counts.get(r.adapter.name, 0) + 1
        return self.adapters.stats(queued, running)
