"""RemoteEngine: the EngineClient (engine/client.py) of the ingress, over the engine replicas' Ray Serve handle,
so server/'s routes, keys, errors and streaming run unchanged against a cluster.

A request is a streaming call to one replica (`handle.options(stream=True, multiplexed_model_id=...)`): its
first item says where it landed (RouteInfo), then RequestOutputs follow. A replica that dies before the first
item is retried on another (nothing has reached the client); one that dies mid-stream ends the stream with
EngineUnavailableError (HTTP 503, in-band in SSE). Admin changes go to one replica, which writes the shared
registry; the call returns once every live replica has read that registry version."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, TypeVar

from ray import exceptions as ray_errors
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from loraplex.cluster.admission import Popularity
from loraplex.cluster.config import ClusterConfig
from loraplex.cluster.messages import ReplicaReport, RouteInfo
from loraplex.cluster.routing import AdapterRouting
from loraplex.engine.admin import AdminOp
from loraplex.engine.client import AdapterTarget
from loraplex.engine.facts import EngineFacts
from loraplex.engine.outputs import EngineSnapshot, EngineStats, RequestOutput
from loraplex.engine.request import Share
from loraplex.errors import EngineUnavailableError
from loraplex.sampling import SamplingParams
from loraplex.server.stats.totals import merge

log = logging.getLogger(__name__)
T = TypeVar("T")
ATTEMPTS = 3  # a request whose replica died before answering is sent again, this many times in all
SYNC_TIMEOUT_S = 5.0  # how long an admin call waits for every replica to read the registry change
WATCH_INTERVAL_S = 0.5  # how often the ingress reads which replicas are alive
_GONE = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, DeploymentUnavailableError, BackPressureError)


def unwrapped(e: BaseException, replica: str | None = None) -> BaseException:
    """A replica's error as the ingress raises it: the engine's own (named causes keep their HTTP status), or
    EngineUnavailableError when the replica is gone."""
    if isinstance(e, ray_errors.RayTaskError) and isinstance(e.cause, BaseException):
        return e.cause
    if isinstance(e, _GONE):
        where = f"replica {replica}" if replica else "no replica"
        return EngineUnavailableError(f"the engine replica serving this request stopped ({where}: "
                                      f"{type(e).__name__}); retry the request")
    return e


class RemoteStream:
    """One request's outputs from a replica (EngineStream). `abort()` cancels the call: the replica aborts it."""

    def __init__(self, gen: DeploymentResponseGenerator, route: RouteInfo, done: Any) -> None:
        self.route = route
        self.adapter = route.adapter  # the version the replica admitted it on
        self._gen = gen
        self._done = done  # called once when the stream ends, however it ends
        self.finished = False

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._gen.__anext__()
        except StopAsyncIteration:
            self._close()
            raise
        except BaseException as e:
            self._close()
            raise unwrapped(e, self.route.replica) from None
        if out.finished:
            self._close()
        return out  # type: ignore[no-any-return]

    def abort(self) -> None:
        if not self.finished:
            self._gen.cancel()
            self._close()

    def _close(self) -> None:
        if not self.finished:
            self.finished = True
            self._done()


class RemoteEngine:
    def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, facts: EngineFacts, tokenizer: Any,
                 cluster: ClusterConfig) -> None:
        """`facts` and `tokenizer`: a replica's (EngineReplica.facts, .tokenizer)."""
        self.handle, self.board, self.cluster = replicas, board, cluster
        # One replica's facts (every replica has the same), with the cluster's running capacity: every batch.
        self.facts = replace(facts, max_num_seqs=facts.max_num_seqs * cluster.replicas)
        self.routing = AdapterRouting(cluster.hot_adapter_threshold, cluster.spill_margin, cluster.affinity,
                                      popularity=Popularity(cluster.popularity_half_life_s),
                                      replicate_share=cluster.replicate_share)
        self.reports: list[ReplicaReport] = []  # as of the latest snapshot(): what the cluster collector renders
        self._tokenizer = tokenizer
        self._changing = asyncio.Lock()  # admin changes one at a time: each waits for the cluster to see it
        self._watch = asyncio.get_running_loop().create_task(self._watch_replicas())

    async def _watch_replicas(self) -> None:
        """Which replicas are alive, for the routing rule (and fresh reports for /metrics between scrapes)."""
        while True:
            try:
                self.reports = await self.board.reports.remote()
                self.routing.set_live({r.view.id for r in self.reports})
            except Exception:  # the board restarting: keep the last view, try again
                log.exception("reading the replicas' reports failed")
            await asyncio.sleep(WATCH_INTERVAL_S)

    # ---- requests --------------------------------------------------------------------------------
    async def add(self, prompt: list[int], sampling: SamplingParams | None = None, adapter: AdapterTarget = None,
                  request_id: str | None = None, cache_salt: str | None = None, share: Share | None = None
                  ) -> RemoteStream:
        """`prompt` as token ids and `adapter` as the server resolved it, sent to the replica as they are; the
        adapter's text ("legal@2") keys the routing and Ray's multiplexed model id."""
        model = None if adapter is None else str(adapter)  # the routing's and Ray's key for it
        label = model or self.facts.model_name
        error: BaseException | None = None
        popularity = self.routing.requested(model, time.time())
        admission = popularity if self.cluster.claim_policy == "frequency" else None  # None: the replica claims
        for _ in range(ATTEMPTS):
            sent = self.routing.dispatch(model, popularity)
            options = self.handle.options(stream=True, multiplexed_model_id=sent.model_id)
            gen = options.generate.remote(prompt, sampling or SamplingParams(), adapter, cache_salt, admission,
                                          sent.claim, share)
            try:
                route = await gen.__anext__()
            except _GONE as e:  # nothing reached the client yet: another replica may take it
                gen.cancel()
                self.routing.abandoned(model)
                error = e
                log.warning("a replica failed before answering (%s); sending the request again", type(e).__name__)
                continue
            except BaseException as e:
                gen.cancel()
                self.routing.abandoned(model)
                raise unwrapped(e) from None
            self.routing.started(model, label, route, sent.claim)
            return RemoteStream(gen, route, lambda: self.routing.finished(model, route))
        raise unwrapped(error) if error else EngineUnavailableError("no engine replica answered")

    # ---- adapters: through one replica; the shared registry carries the change to the others -----------
    async def admin(self, op: AdminOp[T]) -> T:
        """Applied on one replica; a change returns once every live replica has read the registry it wrote."""
        if not op.changes:
            result, _ = await self._call("admin", op)
            return result  # type: ignore[no-any-return]
        async with self._changing:
            result, at = await self._call("admin", op)
            await self._until_synced(at)
            return result  # type: ignore[no-any-return]

    async def reset_prefix_cache(self) -> int:
        """Posted on the board; every live replica runs it at its next report. Returns the blocks dropped."""
        seq = await self.board.post.remote("reset_prefix_cache")
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while time.monotonic() < deadline:
            reports = await self.board.reports.remote()
            if reports and all(r.acked >= seq for r in reports):
                return sum(r.last_result for r in reports)
            await asyncio.sleep(0.05)
        raise EngineUnavailableError("not every replica reset its prefix cache in time; retry")

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except BaseException as e:
            raise unwrapped(e) from None

    async def _until_synced(self, version: int) -> None:
        """Wait until every live replica has read registry `version`: afterwards, any replica a request reaches
        sees the change (no 404 for a just-loaded adapter, no old version after a promotion)."""
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while time.monotonic() < deadline:
            reports = await self.board.reports.remote()
            if all(r.view.registry_version >= version for r in reports):
                return
            await asyncio.sleep(0.02)
        log.warning("not every replica read registry version %d within %.0f s", version, SYNC_TIMEOUT_S)

    # ---- the cluster's state -----------------------------------------------------------------------
    async def snapshot(self) -> EngineSnapshot:
        """The replicas' snapshots summed (their latest reports); the per-replica reports stay in self.reports."""
        self.reports = await self.board.reports.remote()
        merged = merge([r.snapshot for r in self.reports])
        if merged is None:
            raise EngineUnavailableError("no engine replica is reporting yet; retry shortly")
        return merged

    async def stats(self) -> list[EngineStats]:
        """Each live replica's dashboard view, from its latest report (at most a report interval old)."""
        self.reports = await self.board.reports.remote()
        if not self.reports:
            raise EngineUnavailableError("no engine replica is reporting yet; retry shortly")
        return [r.stats for r in self.reports]

    async def replicas(self) -> list[ReplicaView]:
        self.reports = await self.board.reports.remote()
        return [r.view for r in self.reports]

    def shutdown(self) -> None:
        """Nothing to stop here: the replicas belong to Ray Serve."""

    # ---- the tokenizer (the facts: self.facts) -------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer
