"""Who a request's share of the batch belongs to (issue 29, item 1): with keys, the API key, with its keys-file
weight; without keys, the adapter (the base model one tenant); vLLM's priority orders a tenant's own requests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.cli import _server_configs, main, parse
from loraplex.errors import InvalidRequestError
from loraplex.server.auth import key_id, load_keys
from loraplex.server.quotas import Limits
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
    """The server hands the engine the tenant its caps count: the adapter's name, the base model by its served
    name (one encoding of a keyless tenant, not one per layer)."""
    with running(build_app(engine)) as url:
        assert in_engine(url, None, "a", engine) == (("tenant", "a"), 1.0, 0)
        assert in_engine(url, None, BASE, engine)[0] == ("tenant", BASE)


def test_without_keys_the_flags_set_each_adapters_weight_and_caps(engine: AsyncLLMEngine) -> None:
    app = build_app(engine, tenant_weights={"a": 3.0}, open_limits=Limits(requests_per_minute=1))
    with running(app) as url:
        assert in_engine(url, None, "a", engine) == (("tenant", "a"), 3.0, 0)
        body = {"model": BASE, "prompt": "Hi", "max_tokens": 1}
        first = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
        over = httpx.post(url + "/v1/completions", json=body, timeout=60)  # the base model's second this minute
        assert over.status_code == 429 and over.json()["error"]["type"] == "requests", over.text
        assert "requests per minute: limit 1" in over.json()["error"]["message"]
        made_up = {**body, "model": "nope"}  # a name never served: a 404, then its own bucket's 429
        codes = [httpx.post(url + "/v1/completions", json=made_up, timeout=60).status_code for _ in range(2)]
        assert codes == [404, 429]
        rows = {r["tenant"]: r for r in httpx.get(url + "/v1/stats").json()["fair_share"]["tenants"]}
        assert set(rows) == {"a", BASE} and rows["a"]["weight"] == 3.0  # the base model by its served name
        assert rows[BASE]["throttled"] == {"requests": 1} and rows["a"]["throttled"] == {}
        metrics = httpx.get(url + "/metrics").text
        assert "nope" not in metrics  # a made-up name takes no label: its 429 is counted under "other"
        assert 'loraplex_tenant_throttled_total{limit="requests",tenant="other"} 1.0' in metrics
        assert f'loraplex_tenant_throttled_total{{limit="requests",tenant="{BASE}"}} 1.0' in metrics


@pytest.mark.parametrize(("argv", "message"), [
    (["--tenant-weight", "a"], "expected NAME=WEIGHT"),
    (["--tenant-weight", "a=0"], r"a weight is in \(0, 1000\]"),
    (["--tenant-requests-per-minute", "0"], "a cap is at least 1"),
    (["--api-key", "sk-x", "--tenant-weight", "a=2"], "set its weight and caps in the keys file"),
])
def test_tenant_flags_refused_naming_why(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv, "--port", "1"])
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_tenant_flags_configure_a_keyless_server() -> None:
    _, server = _server_configs(parse(["serve", "--tenant-weight", "legal=3", "SmolLM2-135M-Instruct=0.5",
                                       "--tenant-max-in-flight", "8", "--tenant-tokens-per-minute", "9000"]))
    assert server.tenant_weights == (("legal", 3.0), ("SmolLM2-135M-Instruct", 0.5))
    assert (server.tenant_max_in_flight, server.tenant_tokens_per_minute) == (8, 9000)


def test_fair_steps_flag() -> None:
    """Serve's --fair-steps reaches the engine's config (auto by default); a value outside its three is
    refused by the config naming them (for Python users, who build EngineConfig directly)."""
    assert _server_configs(parse(["serve"]))[0].fair_steps == "auto"
    assert _server_configs(parse(["serve", "--fair-steps", "off"]))[0].fair_steps == "off"
    with pytest.raises(InvalidRequestError, match="fair_steps must be one of auto, on, off, got 'yes'"):
        EngineConfig(fair_steps="yes")
