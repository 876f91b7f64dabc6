"""LLMEngine: the synchronous engine. add_request / abort_request / step, nothing else drives the model.

Where a request goes: prepare validates, tokenizes and makes its grammar matcher (any thread), admit queues it
(the stepping thread; add_request does both) -> Scheduler.waiting -> Scheduler.schedule
picks the step's tokens (KV blocks, and adapter slots through the AdapterManager) -> ModelRunner.execute
runs the forward pass and samples -> _process appends tokens, detokenizes, checks stop conditions ->
RequestOutput. Adapter names are parsed once, here; every registration, slot and reference then goes
through `self.adapters` (adapters.manager.AdapterManager), the one owner of adapter state.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraplex.adapters.key import AdapterKey, AdapterSpec, validate_name
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
from loraplex.engine.prepare import PreparedRequest, Stage
from loraplex.engine.outputs import CompletionOutput, EngineSnapshot, EngineStats, PrefixCacheSnapshot, RequestOutput
from loraplex.engine.request import Request, Share
from loraplex.engine.scheduler import ScheduledSeq, Scheduler
from loraplex.engine.step_log import StepLog
from loraplex.engine.structured import StructuredOutputs
from loraplex.errors import InvalidRequestError, LoraplexError, NonFiniteOutputError, PromptTooLongError
from loraplex.sampling import SamplingParams, TokenLogprobs

log = logging.getLogger(__name__)
R = TypeVar("R")


class LLMEngine:
    def __init__(self, config: EngineConfig, host_admission: HostAdmission = admit_all) -> None:
        """`host_admission`: which loaded adapters the host tier caches after their requests (adapters/residency.py;
        a cluster replica's claims); every one by default."""
        self.config = config
        built = build_model(config)  # dtype -> weights -> quantize -> device -> prepack -> memory plan -> LoRA
        self.model_dir, self.model_config, self.model_name = built.model_dir, built.config, built.config.name
        self.dtype_choice, self.dtype = built.dtype, built.dtype.dtype
        self.device, self.device_description = built.device, built.device_description
        self.max_model_len, self.memory = built.max_model_len, built.memory
        self.lora_shapes = built.lora_shapes
        self.facts = EngineFacts(self.model_name, self.model_dir, self.max_model_len, config.block_size,
                                 config.max_num_seqs, built.dtype.name, built.dtype.describe(),
                                 built.device_description, built.memory, config.max_prepare_seconds,
                                 tuple(built.config.eos_token_ids))
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_dir)
        if config.chat_template is not None:
            use_chat_template(self.tokenizer, config.chat_template)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, list(self.model_config.eos_token_ids))
        self.runner = ModelRunner(built.model, built.lora_targets, self.memory.kv_blocks, config.block_size,
                                  self.dtype, self.device, config.seed, self.structured)
        self.blocks = BlockManager(self.memory.kv_blocks, config.block_size, config.enable_prefix_caching)
        registry = AdapterRegistry(
            Path(config.adapter_dir) if config.adapter_dir else None,
            Path(config.registry_file) if config.registry_file else None,
        )
        loader = AdapterLoader(self.lora_shapes, config.max_lora_rank, config.allow_pickle_adapters, self.model_name,
                               self.model_dir, config.enable_lora)
        self.adapters = AdapterManager(registry, config.max_loras, config.max_cpu_loras, loader, host_admission)
        fair_steps = config.fair_steps == "on" or (config.fair_steps == "auto" and self.device.type == "cpu")
        self.scheduler = Scheduler(self.blocks, self.adapters, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_skips, fair_steps)
        self.requests: dict[str, Request] = {}
        self._errors: list[RequestOutput] = []  # requests failed between steps, reported by the next step
        self.nonfinite_requests: dict[str, int] = {}  # model label -> requests ended by NonFiniteOutputError
        self.last_step_tokens = 0  # tokens in the latest forward pass (batch size, for metrics)
        self.step_log = StepLog(self.model_name)  # the last steps' batch composition, for the dashboard
        self._ids = itertools.count()
        # Start-up modules never undo an admin's promotion or unload (adapters/startup.py says the rules).
        self.adapters.register_startup([(validate_name(name), Path(path)) for name, path in config.lora_modules])
        log.info("%d KV blocks of %d tokens, %d adapter slots of rank %d", self.memory.kv_blocks, config.block_size,
                 config.max_loras, config.max_lora_rank)

    # ---- adapters: state owned by self.adapters; administration as engine/admin.py's operations ------
    def admin(self, op: AdminOp[R]) -> R:
        """Apply one administration operation (Register, Unregister, Promote, Pin, ListAdapters) in the caller's
        thread; the manager's lock orders it against the stepping thread. A registration reads the disk here."""
        return op.run(self.adapters)

    # ---- requests -------------------------------------------------------------------------------
    def _tokens(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:  # first: the id scan below then costs at most max_model_len
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; the context (max_model_len) is {self.max_model_len} tokens, "
                "which must also leave room for at least one generated token"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        return text, token_ids

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token sequences, alone and after a space (as vLLM tokenizes them)."""
        seqs: list[list[int]] = []
        for w in words:
            for text in (w, " " + w.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def _adapter(self, adapter: str | AdapterSpec | None) -> AdapterKey | None:
        """'name' or 'name@version' (or a parsed spec) -> the version the request runs on; None = the base model."""
        if adapter is None:
            return None
        return self.adapters.resolve(AdapterSpec.parse(adapter) if isinstance(adapter, str) else adapter)

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | AdapterSpec | None = None, request_id: str | None = None,
                    cache_salt: str | None = None, share: Share | None = None) -> str:
        """Validate and queue a request; raises a LoraplexError subclass naming the cause, queues nothing then.
        Requests with a `cache_salt` share cached prompt blocks only with requests of the same salt (and adapter).
        prepare + admit in the caller's thread; AsyncLLMEngine runs prepare on a worker, admit on the engine thread."""
        return self.admit(self.prepare(prompt, sampling, adapter, cache_salt), request_id, share)

    def prepare(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                adapter: str | AdapterSpec | None = None, cache_salt: str | None = None,
                stage: Stage | None = None) -> PreparedRequest:
        """The part of add_request that depends on the request alone: validation, tokenization, bad_words ids, the
        grammar matcher (compiled once per schema). Touches no engine state, so it is safe on any thread while
        another steps; `stage` is kept saying which part runs (for PreparePool's time-cap error)."""
        stage = stage or Stage("preparing the request")
        sampling = sampling or SamplingParams()
        stage.doing = "tokenizing the prompt"
        text, token_ids = self._tokens(prompt)
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", sampling.stop_token_ids), ("logit_bias", list(sampling.logit_bias)),
                          ("allowed_token_ids", sampling.allowed_token_ids or [])):
            if any(t >= vocab for t in ids):
                raise InvalidRequestError(f"{name}: token ids must be in [0, {vocab})")
        spec = AdapterSpec.parse(adapter) if isinstance(adapter, str) else adapter
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string")
        stage.doing = "tokenizing bad_words"
        bad_words_ids = self._bad_words(sampling.bad_words)
        matcher = None
        if sampling.structured is not None:
            stage.doing = f"compiling the structured output's {sampling.structured.kind}"
            matcher = self.structured.matcher(sampling.structured)
        return PreparedRequest(text, token_ids, sampling, spec, cache_salt, bad_words_ids, matcher)

    def needs_preparing(self, prompt: str | list[int], sampling: SamplingParams | None) -> bool:
        """Whether prepare would run the tokenizer or the grammar compiler (else it is a bounded id check)."""
        return isinstance(prompt, str) or (sampling is not None and bool(sampling.bad_words or sampling.structured))

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
        # Without a tenant of its own, a request's tenant is its adapter's name, the base model being one tenant
        # (tagged, so that no adapter name can be a given tenant's).
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
            label = self.model_name if req.adapter is None else req.adapter.name
            self.nonfinite_requests[label] = self.nonfinite_requests.get(label, 0) + 1
            log.warning("%s", error)
        if not req.finished:
            self._finish(req, "error", keep_cached=False)
        out = self._output(req)
        out.error = error
        return out

    def _collect_loads(self) -> dict[AdapterKey, LoraplexError]:
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
        for slot, key in self.adapters.place_pinned():
            self.runner.load_adapter(slot, self.adapters.weights(key))
        return outputs

    def _process(self, req: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        req.output_token_ids.append(token)
        if logprobs is not None:
            req.output_logprobs.append(logprobs)
        sp = req.sampling
        reason: str | None = None
        if token in sp.stop_token_ids:
            reason, req.stop_reason = "stop", token  # stop tokens end the text, they are not part of it
        elif (not sp.ignore_eos or req.matcher is not None) and token in self.runner.eos_ids:
            reason = "stop"  # a grammar that is complete allows only EOS: its output ends there, whatever ignore_eos
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
            logprobs=list(req.output_logprobs) if req.sampling.logprobs is not None else None,
            delta_logprobs=req.output_logprobs[len(req.output_token_ids) - len(delta_ids):]
            if req.sampling.logprobs is not None else None,
        )
        prompt_lps = None
        if req.sampling.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt_token_ids) - 1:
            prompt_lps = [None, *req.prompt_logprobs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.adapter, [completion], req.finished,
                             num_cached_tokens=req.num_cached_tokens, prompt_logprobs=prompt_lps)

    def prompt_logits(self, prompt: str | list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits [len(prompt), V] (fp32) at every prompt position under `adapter`: one prefill outside the step
        loop (tests, evaluation), on KV blocks and an adapter slot borrowed as a request's would be."""
        _, token_ids = self._tokens(prompt)
        key = self._adapter(adapter)
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
        base = self.model_name
        queued = {base: len(self.scheduler.waiting) - sum(snap.adapters.queued.values()), **snap.adapters.queued}
        running = {base: len(self.scheduler.running) - sum(snap.adapters.running.values()), **snap.adapters.running}
        return EngineStats(snap, self.adapters.tiers(), self.step_log.history(), queued, running)

    def _label(self, adapter: str | None) -> str:
        return self.model_name if adapter is None else adapter

    def adapter_stats(self) -> AdapterStats:
        """Adapter-cache counters plus queued and running requests per adapter (by name, all versions)."""
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for reqs, counts in ((self.scheduler.waiting, queued), (self.scheduler.running, running)):
            for r in reqs:
                if r.adapter is not None:
                    counts[r.adapter.name] = counts.get(r.adapter.name, 0) + 1
        return self.adapters.stats(queued, running)
