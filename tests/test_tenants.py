"""Who a request's share of the batch belongs to (issue 29, item 1): with keys, the API key, with its keys-file
weight; without keys, the adapter (the base model one tenant); vLLM's priority orders a tenant's own requests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import key_id, load_keys
from server_util import running

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture  # one engine per test: a served app shuts its engine down when it stops
def engine(adapter_factory: Callable[..., Path]) -> Iterator[AsyncLLMEngine]:
    adapter = adapter_factory("tenants_a", r=4, targets=ATTN, seed=33)
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=256, lora_modules=(("a", str(adapter)),)))
    yield engine
    engine.shutdown()


def in_engine(url: str, key: str | None, model: str, engine: AsyncLLMEngine, **body: Any) -> tuple[Any, float, int]:
    """The tenant, weight and priority the engine holds for a streaming request, read while it streams."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    payload = {"model": model, "prompt": "Tell me a story.", "max_tokens": 200, "ignore_eos": True, "stream": True,
               **body}
    with httpx.stream("POST", url + "/v1/completions", json=payload, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        next(r.iter_lines())  # the first chunk: it is running
        [req] = list(engine.engine.requests.values())
        return req.tenant, req.weight, req.priority


def test_a_key_is_a_tenant_with_its_weight(engine: AsyncLLMEngine, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {"sk-big": {"adapters": ["a"], "weight": 3},
                                         "sk-small": {"adapters": ["a"]}}}))
    with running(build_app(engine, keys=load_keys(keys))) as url:
        assert in_engine(url, "sk-big", "a", engine) == (("tenant", key_id("sk-big")), 3.0, 0)
        assert in_engine(url, "sk-small", "a", engine, priority=-4) == (("tenant", key_id("sk-small")), 1.0, -4)
        assert in_engine(url, "sk-small", BASE, engine)[0] == ("tenant", key_id("sk-small"))  # any model: one key


def test_without_keys_the_adapter_is_the_tenant(engine: AsyncLLMEngine) -> None:
    with running(build_app(engine)) as url:
        assert in_engine(url, None, "a", engine) == (("adapter", "a"), 1.0, 0)
        assert in_engine(url, None, BASE, engine)[0] == ("adapter", None)
