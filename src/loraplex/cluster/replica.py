"""EngineReplica: one AsyncLLMEngine as a Ray Serve replica. Ray Serve's model multiplexing routes a request
whose multiplexed model id is an adapter to the replicas that claimed it; a replica claims an adapter (Ray's
per-replica LRU of `max_adapters_per_replica` ids) when a request for it arrives, routed there by id or not, and
claim admission (cluster/admission.py) lets it; otherwise it serves the request on a transient copy.

Everything that crosses the handle is plain data: token ids and SamplingParams in, RouteInfo then RequestOutputs
out of `generate` (a streaming call, cancelled when the ingress stops reading: the engine request is aborted).
Two background tasks keep the replica in step with the cluster: one applies changes other replicas made to the
shared registry file (a stat every 0.1 s), one reports to the board and runs its commands."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray import serve
from ray.serve.handle import DeploymentHandle

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.cluster.admission import ClaimAdmission
from loraplex.cluster.config import ClusterConfig
from loraplex.cluster.messages import ReplicaReport, RouteInfo, lean
from loraplex.config import EngineConfig
from loraplex.engine.admin import AdminOp, IsResident, Prefetch, Readmit, RegistryVersion, SyncRegistry
from loraplex.engine.client import AdapterTarget
from loraplex.engine.facts import EngineFacts
from loraplex.engine.outputs import RequestOutput
from loraplex.engine.request import Share
from loraplex.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
REGISTRY_POLL_S = 0.1  # how often the shared registry file is stat'ed: promotions reach every replica within it


class Claim:
    """What Ray Serve's multiplexing keeps per adapter id on a replica. Ray calls `__del__` when its LRU of ids
    drops this one (in a worker thread): the replica forgets the claim, and the engine's host tier drops what its
    admission policy no longer caches unless a request uses it, so the tier and Ray's routing agree on what this
    replica holds. Otherwise the two LRUs, updated at different moments, pick different victims, and Ray routes
    requests to a replica that has just evicted their adapter (a cold load Ray counts as a hit)."""

    def __init__(self, model_id: str, unclaim: Callable[[str], int]) -> None:
        self.model_id, self._unclaim = model_id, unclaim
        self._released = False

    def __del__(self) -> None:  # Ray calls it on eviction; the garbage collector calls it again later: once only
        if not self._released:
            self._released = True
            try:
                self._unclaim(self.model_id)
            except Exception:  # an exception would fail the load Ray evicts for: the tier's own LRU frees it later
                log.exception("dropping unclaimed adapter %s from host memory failed", self.model_id)


@serve.deployment
class EngineReplica:
    async def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig, torch_threads: int,
                       board: DeploymentHandle) -> None:
        import torch

        from loraplex.engine.async_engine import AsyncLLMEngine

        torch.set_num_threads(torch_threads)
        # The host tier caches what this replica claims (and keeps what a request uses): an adapter it serves only
        # now and then, unclaimed, evicts no claimed one and leaves with its last request.
        self.admission = ClaimAdmission(cluster.max_adapters_per_replica, cluster.popularity_half_life_s)
        self.engine = AsyncLLMEngine(engine_config, host_admission=self._claims)
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.actor_name = ctx.replica_id.to_full_id_str()
        self.cluster = cluster
        self.board = board
        self.served: dict[str, int] = {}
        self.acked, self.last_result = -1, 0
        self._reporting = asyncio.Lock()  # one report (and its commands) at a time: each command runs once

        def unclaim(model_id: str) -> int:
            self.admission.unclaimed(model_id)
            return self.engine.engine.admin(Readmit())  # Ray's worker thread: at once, under the manager's lock

        async def claim(model_id: str) -> Claim:
            # Ray calls this once per id it does not hold (then keeps the id, LRU): resolving raises for an unknown
            # adapter, so no replica claims one; the load itself runs in the background, in the engine's tiers.
            # The request's own target (`generate`) is used as it is: Ray hands over only its text.
            await self.engine.admin(Prefetch(self._claiming.get(model_id) or model_id))
            return Claim(model_id, unclaim)

        self._claiming: dict[str, AdapterSpec | AdapterKey] = {}  # model id -> the target of a request claiming it

        self.claim: Callable[[str], Awaitable[Claim]] = serve.multiplexed(
            max_num_models_per_replica=cluster.max_adapters_per_replica)(claim)
        self._tasks = [asyncio.create_task(self._watch_registry()), asyncio.create_task(self._report_loop())]
        log.info("engine replica %s (pid %d) serving %s", self.id, os.getpid(), self.engine.facts.model_name)

    def _claims(self, key: AdapterKey) -> bool:
        """The host admission policy: a claim by name covers its current version, one by "name@version" that one."""
        return self.admission.holds(key.name) or self.admission.holds(str(key))

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if hasattr(self, "engine"):
            self.engine.shutdown()

    # ---- requests --------------------------------------------------------------------------------
    async def generate(self, prompt: list[int], sampling: SamplingParams, target: AdapterTarget,
                       cache_salt: str | None, popularity: float | None = None, claim: bool = True,
                       share: Share | None = None) -> AsyncIterator[RouteInfo | RequestOutput]:
        """RouteInfo, then the request's outputs. Cancelled by the ingress (client gone): the request is aborted.
        `popularity`: the adapter's request count at the ingress, for claim admission (None: always claim);
        claim=False (a request spilled for a busy holder): served without a claim (its weights leave with its last
        request), unless this replica claims it already.
        `target`: the adapter as the ingress resolved it (its text keys admission and Ray's model ids)."""
        adapter = None if target is None else str(target)
        resident = target is None or await self.engine.admin(IsResident(target))
        now = time.time()
        keep = adapter is None or (self.admission.admit(adapter, popularity, now) if claim
                                   else self.admission.holds(adapter))
        if target is not None and adapter is not None and keep:
            # Recorded first, so the host tier caches the load the claim starts (the policy asks the claims).
            held_before = self.admission.holds(adapter)
            self.admission.claimed(adapter, popularity, now)
            self._claiming[adapter] = target
            try:
                await self.claim(adapter)
            except BaseException:
                if not held_before:
                    self.admission.unclaimed(adapter)
                raise
            finally:
                self._claiming.pop(adapter, None)
        label = adapter or self.engine.facts.model_name
        self.served[label] = self.served.get(label, 0) + 1
        stream = await self.engine.add(prompt, sampling, target, cache_salt=cache_salt, share=share)
        try:
            yield RouteInfo(self.id, resident, stream.adapter, keep)
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def facts(self) -> EngineFacts:
        return self.engine.facts

    def tokenizer(self) -> Any:
        """The engine's tokenizer, for the ingress (pickled by Ray: it needs no transformers AutoTokenizer, whose
        import brings torch)."""
        return self.engine.tokenizer

    # ---- adapter administration: the registry file on the shared store is the cluster's truth ----------
    async def admin(self, op: AdminOp[T]) -> tuple[T, int]:
        """Apply an administration operation here (a change is written to the shared registry, which the others
        read); returns its result and the registry version this replica then holds."""
        result = await self.engine.admin(op)
        return result, await self.engine.admin(RegistryVersion())

    # ---- keeping in step ---------------------------------------------------------------------------
    async def _watch_registry(self) -> None:
        while True:
            try:
                changed = await self.engine.admin(SyncRegistry())
                if changed:
                    log.info("replica %s applied registry changes to %s", self.id, ", ".join(changed))
                    await self._report()  # the ingress waits for every replica to have seen an admin change
            except Exception:  # an unreadable registry is logged and retried; serving goes on
                log.exception("replica %s: syncing the shared registry failed", self.id)
            await asyncio.sleep(REGISTRY_POLL_S)

    async def _report_loop(self) -> None:
        while True:
            try:
                await self._report()
            except Exception:
                log.exception("replica %s: reporting to the board failed", self.id)
            await asyncio.sleep(self.cluster.report_interval)

    async def _report(self) -> None:
        async with self._reporting:
            await self._report_locked()

    async def _report_locked(self) -> None:
        view = (await self.engine.replicas())[0]
        view.id = self.id
        stats = lean((await self.engine.stats())[0], self.id)
        report = ReplicaReport(view, stats, self.actor_name, dict(self.served), self.acked, self.last_result)
        commands, latest = await self.board.report.remote(report)
        if self.acked < 0:
            self.acked = latest
        for seq, command in commands:
            if command == "reset_prefix_cache":
                self.last_result = await self.engine.reset_prefix_cache()
            else:
                log.warning("replica %s: unknown board command %r", self.id, command)
            self.acked = seq
        if commands:
            await self.board.report.remote(ReplicaReport(view, stats, self.actor_name, dict(self.served),
                                                         self.acked, self.last_result))
