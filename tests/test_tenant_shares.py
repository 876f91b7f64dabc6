"""Each fair-share tenant's books (issue 29, item 5): requests queued and running, tokens served, the share of the
last minute beside the weight's, 429s by cap; bounded whatever names requests carry. Then through a served app with
keys: the rows on /metrics and /v1/stats, and a tenant key seeing its own row only, without the shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import key_id, load_keys
from loraplex.server.quotas import SWEEP_AT, Limits, Quotas
from loraplex.server.stats.shares import SHARE_WINDOW_S, Shares
from server_util import running


def test_shares_of_the_last_minute_beside_the_weights() -> None:
    s = Shares()
    a, b = s.ledger("a", 1.0), s.ledger("b", 3.0)
    a.served(100, now=1000.0)
    b.served(300, now=1000.5)
    rows = s.rows(now=1001.0)
    assert rows["a"].share == pytest.approx(0.25) and rows["b"].share == pytest.approx(0.75)
    assert rows["a"].weight_share == pytest.approx(0.25) and rows["b"].weight_share == pytest.approx(0.75)
    a.served(50, now=1000.0 + SHARE_WINDOW_S)  # a minute on: b's tokens have left the window, a's first ones too
    rows = s.rows(now=1000.0 + SHARE_WINDOW_S)
    assert rows["a"].share == 1.0 and rows["a"].window_tokens == 50 and rows["a"].output_tokens == 150
    assert rows["b"].share == 0.0 and rows["b"].weight_share == 0.0  # idle: entitled to nothing now
    assert rows["a"].weight_share == 1.0
    b.queued = 1  # waiting again: entitled to its weight's share at once
    assert s.rows(now=1000.0 + SHARE_WINDOW_S)["b"].weight_share == pytest.approx(0.75)
    assert Shares().rows() == {}


def test_429s_by_cap_and_only_known_tenants_get_rows() -> None:
    s = Shares()
    assert s.throttled("key-1", 2.0, "requests", known=True)
    assert s.throttled("key-1", 2.0, "tokens", known=True)
    assert not s.throttled("made-up", 1.0, "requests", known=False)  # a keyless name never accepted: no row
    row = s.rows()["key-1"]
    assert row.throttled == {"requests": 1, "tokens": 1} and row.last_limit == "tokens" and row.weight == 2.0
    assert "made-up" not in s.rows() and s.unattributed == {"requests": 1}
    s.ledger("adapter-x", 1.0)  # accepted once: from now on its 429s are its own
    assert s.throttled("adapter-x", 1.0, "in_flight", known=False)


def test_the_ledgers_are_bounded() -> None:
    s = Shares(max_tenants=3)
    for t in ("a", "b", "c", "d"):
        s.ledger(t, 1.0)
    assert list(s.rows()) == ["b", "c", "d"]  # the least recently active went first
    s.ledger("b", 5.0)  # touched: now the most recent, with the weight it has now
    s.ledger("e", 1.0)
    assert list(s.rows()) == ["d", "b", "e"] and s.rows()["b"].weight == 5.0


def test_idle_books_are_swept_so_made_up_names_cannot_grow_them() -> None:
    now = [0.0]
    q = Quotas(default_in_flight=10, clock=lambda: now[0])
    limits = Limits(requests_per_minute=5)
    for i in range(3 * SWEEP_AT):
        q.admit(f"name-{i}", limits, 1, 0)
        q.release(f"name-{i}", 1)
        now[0] += 0.1  # a new name every 0.1 s: a full bucket again after 12 s
    assert len(q.books) <= SWEEP_AT
    q.admit("busy", limits, 1, 0)  # in flight: kept through a sweep
    q.sweep_at = 0
    q.admit("next", limits, 1, 0)
    assert "busy" in q.books and "next" in q.books


# ---- through a served app ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    adapter = adapter_factory("shares_a", r=4, targets=ATTN, seed=21)
    keys = tmp_path_factory.mktemp("shares") / "keys.json"
    keys.write_text(json.dumps({"keys": {
        "sk-heavy": {"adapters": ["a"], "weight": 3}, "sk-light": {"adapters": ["a"], "requests_per_minute": 1},
        "sk-admin": {"adapters": ["*"], "admin": True}}}))
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=512, lora_modules=(("a", str(adapter)),)))
    with running(build_app(engine, keys=load_keys(keys))) as url:
        yield url


def _post(url: str, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": "a", "prompt": "Tell me a story.", "max_tokens": max_tokens, "ignore_eos": True})


def test_each_tenants_row_on_metrics_and_stats(url: str) -> None:
    assert _post(url, "sk-heavy", 6).status_code == 200
    assert _post(url, "sk-light", 2).status_code == 200
    assert _post(url, "sk-light", 2).status_code == 429  # its second this minute
    heavy, light = key_id("sk-heavy"), key_id("sk-light")
    admin = {"Authorization": "Bearer sk-admin"}
    metrics = httpx.get(url + "/metrics", headers=admin).text
    assert f'loraplex_tenant_generation_tokens_total{{tenant="{heavy}"}} 6.0' in metrics
    assert f'loraplex_tenant_generation_tokens_total{{tenant="{light}"}} 2.0' in metrics
    assert f'loraplex_tenant_weight{{tenant="{heavy}"}} 3.0' in metrics
    assert f'loraplex_tenant_requests{{state="running",tenant="{heavy}"}} 0.0' in metrics
    assert f'loraplex_tenant_throttled_total{{limit="requests",tenant="{light}"}} 1.0' in metrics
    assert f'loraplex_tenant_share{{tenant="{heavy}"}} 0.75' in metrics  # 6 of the minute's 8 tokens
    assert "sk-heavy" not in metrics and "sk-light" not in metrics  # ids, never keys

    fair = httpx.get(url + "/v1/stats", headers=admin).json()["fair_share"]
    rows = {r["tenant"]: r for r in fair["tenants"]}
    assert fair["window_s"] == 60 and set(rows) == {heavy, light}
    assert rows[heavy]["output_tokens"] == 6 and rows[heavy]["share"] == 0.75 and rows[heavy]["weight"] == 3.0
    assert rows[heavy]["prompt_tokens"] > 0 and rows[heavy]["queued"] == rows[heavy]["running"] == 0
    assert rows[light]["throttled"] == {"requests": 1} and rows[light]["last_limit"] == "requests"

    mine = httpx.get(url + "/v1/stats", headers={"Authorization": "Bearer sk-light"}).json()["fair_share"]
    assert [r["tenant"] for r in mine["tenants"]] == [light]  # its own row; the others' traffic is not its to see
    assert mine["tenants"][0]["share"] is None and mine["tenants"][0]["weight_share"] is None
    assert mine["tenants"][0]["throttled"] == {"requests": 1}


def test_queued_and_running_while_in_flight(url: str) -> None:
    body = {"model": "a", "prompt": "Tell me a story.", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": "Bearer sk-heavy"}) as r:
        lines = r.iter_lines()
        next(lines)  # its first token is out: running
        stats = httpx.get(url + "/v1/stats", headers={"Authorization": "Bearer sk-heavy"}).json()["fair_share"]
        [row] = stats["tenants"]
        assert (row["queued"], row["running"]) == (0, 1)
        lines.close()
