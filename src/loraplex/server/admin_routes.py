"""GET /v1/models (and one by id), adapter management (vLLM's load/unload bodies, plus promote and pin), /health,
/ping, /version, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import loraplex
from loraplex.engine.admin import ListAdapters, Pin, Promote, Register, Unregister
from loraplex.server.errors import APIError
from loraplex.server.openai_routes import ERRORS
from loraplex.server.protocol import LoadLoRARequest, PinLoRARequest, PromoteLoRARequest, UnloadLoRARequest
from loraplex.server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex  # type: ignore[no-any-return]


def _admin(request: Request) -> ServerState:
    """The state, once the caller's key has the admin scope (the engine validates the names it is given)."""
    st = _state(request)
    st.auth.check_admin(st.auth.scope(request))
    return st


@router.get("/v1/models", responses=ERRORS)
async def list_models(request: Request) -> dict[str, Any]:
    """The base model and every adapter the caller's key may use, each adapter with its parent (as vLLM lists them)."""
    return {"object": "list", "data": await _models(request)}


@router.get("/v1/models/{model_id:path}", responses=ERRORS)
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One entry of /v1/models (OpenAI's retrieve). Another tenant's adapter is as unknown as a name never served."""
    for entry in await _models(request):
        if entry["id"] == model_id:
            return entry
    raise APIError(404, f"The model '{model_id}' does not exist", "model_not_found", "model")


async def _models(request: Request) -> list[dict[str, Any]]:
    st = _state(request)
    scope = st.auth.scope(request)
    engine, mem = st.engine, st.engine.facts.memory
    pc = (await engine.snapshot()).prefix_cache
    base = {"id": st.served_name, "object": "model", "created": st.created, "owned_by": "loraplex",
            "root": str(engine.facts.model_dir), "parent": None, "max_model_len": engine.facts.max_model_len,
            "dtype": engine.facts.dtype, "dtype_reason": engine.facts.dtype_reason, "device": engine.facts.device,
            "quantization": mem.quantization,
            "batch_invariant": {"enabled": engine.facts.batch_invariance.enabled,
                                "detail": engine.facts.batch_invariance.detail},
            "memory": {"weights_bytes": mem.weights, "kv_cache_bytes": mem.kv_cache,
                       "adapter_slots_bytes": mem.adapters, "adapter_slots": mem.adapter_slots,
                       "prefix_cache": {"enabled": pc.enabled, "cached_blocks": pc.cached_blocks,
                                        "block_size": engine.facts.block_size, "hit_rate": pc.hit_rate,
                                        "queries_tokens": sum(pc.queries.values()),
                                        "hits_tokens": sum(pc.hits.values())}}}
    # Where each adapter is held: the engine's tiers, or, behind a cluster, each replica's.
    replicas = await engine.replicas()
    base["replicas"] = [{"id": r.id, "running": r.running, "waiting": r.waiting, "adapters_resident": len(r.resident)}
                        for r in replicas]
    if not scope.admin:  # totals over every tenant's traffic: a tenant key sees its own rows on /v1/stats only
        base["memory"]["prefix_cache"] = {"enabled": pc.enabled, "block_size": engine.facts.block_size}
        base["replicas"] = [{"id": r.id} for r in replicas]
    data = [base] if scope.may_use(None) else []
    for a in await engine.admin(ListAdapters()):
        if scope.may_use(a.name):
            data.append({"id": a.name, "object": "model", "created": st.created, "owned_by": "loraplex",
                         "root": str(a.path), "parent": st.served_name, "version": a.current,
                         "versions": list(a.versions), "pinned": a.pinned,
                         "resident_on": [{"replica": r.id, "version": key.version, "tiers": tiers}
                                         for r in replicas for key, tiers in r.resident.items() if key.name == a.name],
                         "replica_versions": {r.id: r.versions.get(a.name) for r in replicas}})
    return data


@router.post("/v1/load_lora_adapter", responses=ERRORS)
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> JSONResponse:
    """Register (and by default promote) a version of an adapter; it is loaded and validated before this returns."""
    st = _admin(request)
    st.check_adapter_path(body.lora_path)
    # Loading reads and validates off the event loop and off the engine thread: decoding goes on meanwhile.
    key = await st.engine.admin(Register(body.lora_name, body.lora_path, body.version, body.promote))
    version = key.version
    return JSONResponse({"status": "ok", "lora_name": body.lora_name, "version": version, "promoted": body.promote,
                         "message": f"Success: LoRA adapter '{body.lora_name}' version {version} added successfully."})


@router.post("/v1/unload_lora_adapter", responses=ERRORS)
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> JSONResponse:
    """Remove an adapter: new requests get 404, running ones finish; its weights are freed when unused."""
    st = _admin(request)
    await st.engine.admin(Unregister(body.lora_name))
    return JSONResponse({"status": "ok", "lora_name": body.lora_name,
                         "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})


@router.post("/v1/promote_lora_adapter", responses=ERRORS)
async def promote_lora_adapter(body: PromoteLoRARequest, request: Request) -> JSONResponse:
    st = _admin(request)
    await st.engine.admin(Promote(body.lora_name, body.version))
    return JSONResponse({"status": "ok", "lora_name": body.lora_name, "version": body.version})


@router.post("/v1/pin_lora_adapter", responses=ERRORS)
async def pin_lora_adapter(body: PinLoRARequest, request: Request) -> JSONResponse:
    st = _admin(request)
    await st.engine.admin(Pin(body.lora_name, body.pinned))
    return JSONResponse({"status": "ok", "lora_name": body.lora_name, "pinned": body.pinned})


@router.post("/reset_prefix_cache", responses=ERRORS)
async def reset_prefix_cache(request: Request) -> JSONResponse:
    """Forget every cached prompt block (vLLM's endpoint); requests running keep theirs. Admin scope."""
    st = _admin(request)
    dropped = await st.engine.reset_prefix_cache()
    return JSONResponse({"status": "ok", "cached_blocks_dropped": dropped})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    st = _state(request)
    if st.draining:
        return JSONResponse({"status": "draining"}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/ping")
async def ping(request: Request) -> JSONResponse:
    """vLLM's (and SageMaker's) health check: the same answer as /health."""
    return await health(request)


@router.post("/ping")
async def ping_post(request: Request) -> JSONResponse:
    """SageMaker posts its health check (one operation per method keeps the OpenAPI ids unique)."""
    return await health(request)


@router.get("/version")
async def version() -> dict[str, str]:
    """The server's version, as vLLM's /version gives it (public, as /health is)."""
    return {"version": loraplex.__version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    st = _state(request)
    st.auth.check_metrics(st.auth.scope(request))  # every tenant's name and traffic: admin or metrics scope
    return Response(st.metrics.render(await st.engine.snapshot()), media_type=CONTENT_TYPE_LATEST)
