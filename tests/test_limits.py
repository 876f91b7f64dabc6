"""Resource limits over HTTP: what a client can ask for is bounded — max_tokens beyond the context, huge n, many
choices over a KV cache that holds a few of them, weight files larger than any adapter, thousands of made-up
adapter names (no map or metric label grows) — and metric labels are capped."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.state import ServerState
from server_util import running

MAX_LEN = 256


@pytest.fixture(scope="module")
def server(adapter_factory: Callable[..., Path]) -> Iterator[tuple[str, ServerState]]:
    mods = tuple((f"l{i}", str(adapter_factory(f"lim{i}", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=400 + i)))
                 for i in range(3))
    # 24 MiB of fp32 KV cache: 2 sequences of the full 256-token context.
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=MAX_LEN, max_loras=2,
                                         kv_cache_memory=24 << 20))
    app = build_app(engine, served_name="base", max_metric_labels=2)
    with running(app) as url:
        yield url, app.state.loraplex


def test_max_tokens_beyond_the_context_is_refused(server: tuple[str, ServerState]) -> None:
    url, _ = server
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        r = httpx.post(url + path, json={"model": "base", "max_tokens": 10**9, **body})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and f"max_model_len {MAX_LEN}" in err["message"], err
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "Hi", "n": 10_000})
    assert r.status_code == 400 and "n must be in [1, 16]" in r.text


@pytest.mark.slow
def test_many_choices_over_a_small_kv_cache_all_finish(server: tuple[str, ServerState]) -> None:
    """16 choices of 100 tokens each, on a cache that holds 4 of them at once (34 blocks of 16 tokens; each
    needs 7): they queue and all complete."""
    url, _ = server
    r = httpx.post(url + "/v1/completions", json={"model": "l0", "prompt": "Once upon a time", "n": 16,
                                                   "max_tokens": 100, "ignore_eos": True, "temperature": 0},
                   timeout=600)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 16
    assert r.json()["usage"]["completion_tokens"] == 16 * 100


def test_oversized_weight_file_is_refused_unread(server: tuple[str, ServerState], tmp_path: Path,
                                                 adapter_factory: Callable[..., Path]) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text((adapter_factory("lim0") / "adapter_config.json").read_text())
    with open(big / "adapter_model.safetensors", "wb") as f:
        f.truncate(50 << 30)  # 50 GiB, sparse: reading it would fill host memory
    url, _ = server
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)}, timeout=60)
    assert r.status_code == 400
    assert re.search(r"is 51200\.0 MiB, more than the [0-9.]+ MiB", r.json()["error"]["message"]), r.text


def _model_labels(url: str) -> set[str]:
    return set(re.findall(r'^loraplex_requests_total\{model="([^"]*)"', httpx.get(url + "/metrics").text, re.M))


@pytest.mark.slow
def test_thousands_of_unknown_names_grow_nothing(server: tuple[str, ServerState]) -> None:
    url, st = server
    manager = st.engine.engine.adapters  # type: ignore[attr-defined]
    httpx.post(url + "/v1/completions", json={"model": "nobody", "prompt": "Hi", "max_tokens": 1})

    def sizes() -> tuple[int, ...]:
        return (len(httpx.get(url + "/metrics").text.splitlines()), len(manager.registry.entries),
                len(manager.registry._seen), len(manager.table.records), len(manager.users), len(st.engine._streams))

    before = sizes()

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            async def one(i: int) -> int:
                r = await c.post(url + "/v1/completions", json={"model": f"tenant-{i}", "prompt": "Hi", "max_tokens": 1})
                return r.status_code
            out: list[int] = []
            for start in range(0, 2000, 100):
                out += await asyncio.gather(*(one(i) for i in range(start, start + 100)))
            return out

    assert set(asyncio.run(flood())) == {404}
    assert sizes() == before
    assert "tenant-1" not in httpx.get(url + "/metrics").text


def test_metric_labels_are_capped(server: tuple[str, ServerState]) -> None:
    """With --max-metric-labels 2, the first two models keep their series; the rest count under model="other"."""
    url, _ = server
    for model in ("base", "l0", "l1", "l2", "l1@1"):
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, timeout=60)
        assert r.status_code == 200, r.text
    labels = _model_labels(url)
    assert "other" in labels and "l1@1" not in labels
    assert len(labels - {"other", "unknown"}) <= 2
