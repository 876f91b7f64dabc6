"""The Ray Serve application: the ingress (server/'s FastAPI app over a RemoteEngine), the engine replicas and
the board; `start` deploys it on a local Ray instance or an existing cluster, `run` serves until SIGTERM."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.schema import LoggingConfig
from ray.serve.handle import DeploymentHandle

from loraplex.cluster.board import ReplicaBoard
from loraplex.cluster.config import ClusterConfig
from loraplex.cluster.metrics import ClusterCollector
from loraplex.cluster.remote_engine import RemoteEngine
from loraplex.cluster.replica import EngineReplica
from loraplex.config import EngineConfig, ServerConfig
from loraplex.errors import InvalidRequestError
from loraplex.server.app import build_app
from loraplex.server.auth import KeyScope
from loraplex.server.serve import adapter_roots, guard_config, tenant_settings

log = logging.getLogger(__name__)

# Serve's controller kills an HTTP proxy that is not ready within 5 s (then 10, 15...), and serve.start fails with
# ActorDiedError. On a 2-core machine busy with other work (a second test worker, chromium) the proxy took longer
# than that to start: allow a minute. The controller reads it from its environment; a value in ours wins.
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The OpenAI API of `loraplex serve`, built by server.app.build_app over the replicas."""

    async def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, server: ServerConfig,
                       cluster: ClusterConfig, keys: dict[str, KeyScope] | None,
                       roots: tuple[Path, ...] | None) -> None:
        # A replica's facts and tokenizer, unpickled here: the tokenizer's class module only, never torch or the model.
        facts, tokenizer = await replicas.facts.remote(), await replicas.tokenizer.remote()
        self.engine = RemoteEngine(replicas, board, facts, tokenizer, cluster)
        self.server, self.keys, self.roots = server, keys, roots

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_app(self.engine, self.server.served_model_name, self.keys, self.server.max_queue,
                        shutdown_engine=False, max_metric_labels=self.server.max_metric_labels,
                        guard=guard_config(self.server), adapter_roots=self.roots,
                        allowed_origins=self.server.allowed_origins, **tenant_settings(self.server))
        app.state.loraplex.metrics.registry.register(ClusterCollector(self.engine))
        return app


def application(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig,
                keys: dict[str, KeyScope] | None) -> serve.Application:
    if engine.max_cpu_loras < cluster.max_adapters_per_replica:
        raise InvalidRequestError(
            f"--max-adapters-per-replica {cluster.max_adapters_per_replica} > --max-cpu-loras {engine.max_cpu_loras}: "
            "a replica would claim adapters its host tier cannot hold; raise --max-cpu-loras or lower the claim")
    if engine.registry_file is None:
        raise InvalidRequestError("a cluster needs a registry file on the shared adapter store (--registry-file)")
    threads = server.torch_threads or max(1, math.ceil(cluster.cpus_per_replica))
    # libgomp's spin count (set by the CLI before torch loads) must reach the replica processes too.
    env = {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}
    board = ReplicaBoard.bind()
    replicas = EngineReplica.options(
        num_replicas=cluster.replicas, max_ongoing_requests=engine.max_num_seqs + server.max_queue,
        graceful_shutdown_timeout_s=server.drain_timeout, graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": cluster.cpus_per_replica, "runtime_env": {"env_vars": env}},
    ).bind(engine, cluster, threads, board)
    return Ingress.options(max_ongoing_requests=100_000).bind(replicas, board, server, cluster, keys,
                                                                adapter_roots(engine, server))


def start(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig,
          keys: dict[str, KeyScope] | None = None) -> str:
    """Join Ray (or start it here), deploy the application; returns its URL once every replica is up."""
    app = application(engine, server, cluster, keys)  # a bad combination of flags fails before Ray starts
    if server.any_adapter_path:
        log.warning("VLLM_ALLOW_RUNTIME_LORA_UPDATING: runtime loads may read any path the replicas can read")
    if not ray.is_initialized():
        ray.init(address=cluster.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    # Serve's access log writes a line per call, reports included (4 a second per replica), each forwarded to the
    # driver: off. serve.start's config covers Serve's own actors, serve.run's the application's deployments.
    quiet = LoggingConfig(enable_access_log=False)
    serve.start(http_options={"host": server.host, "port": server.port,
                              "keep_alive_timeout_s": server.timeout_keep_alive, "root_path": server.root_path},
                logging_config=quiet,
                controller_options={"runtime_env": {"env_vars": SERVE_ENV}})
    serve.run(app, name=cluster.app_name, route_prefix="/", logging_config=quiet)
    url = f"http://{server.host}:{server.port}"
    log.info("cluster %r: %d engine replicas behind %s", cluster.app_name, cluster.replicas, url)
    return url


def stop(cluster: ClusterConfig) -> None:
    """Take the application down: on a local Ray instance, Serve and Ray with it; on a joined cluster only this
    application (other applications keep serving), then disconnect."""
    if cluster.ray_address is None:
        serve.shutdown()
    else:
        serve.delete(cluster.app_name)
    ray.shutdown()


def run(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig,
        keys: dict[str, KeyScope] | None = None) -> None:
    """`loraplex cluster`: deploy, then serve until SIGTERM or SIGINT, then take the application down."""
    start(engine, server, cluster, keys)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("stopping the cluster application")
    stop(cluster)
