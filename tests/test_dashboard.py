"""GET /dashboard in a real headless Chromium, and GET /v1/stats behind it: the page loads without console
errors, traffic to two adapters shows in both tenants' rows within 2 s, a promotion made on the page shows
the new version, and with a keys file the page asks for a key (admin: everything; tenant: its own rows).
Screenshots (light and dark, 1280x800) go to $LORAPLEX_SCREENSHOTS (`make screenshots`: docs/images)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser_util import chromium
from conftest import ALL, ATTN, MLP
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from loraplex.server.auth import KeyScope, key_id
from server_util import running

BASE = "SmolLM2-135M-Instruct"
ADMIN, TENANT = "sk-dash-admin", "sk-dash-legal"
VIEW = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def adapters(adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {"legal": adapter_factory("dash-legal", r=8, targets=ATTN, seed=71),
            "sql": adapter_factory("dash-sql", r=4, targets=MLP, seed=72),
            "poetry": adapter_factory("dash-poetry", r=16, targets=ALL, seed=73),
            "poetry-v2": adapter_factory("dash-poetry-v2", r=8, targets=ALL, seed=74)}


@pytest.fixture(scope="module")
def engine(adapters: dict[str, Path]) -> Iterator[AsyncLLMEngine]:
    mods = tuple((n, str(adapters[n])) for n in ("legal", "sql", "poetry"))
    eng = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=256, max_loras=3,
                                      max_cpu_loras=4))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def open_url(engine: AsyncLLMEngine) -> Iterator[str]:
    with running(build_app(engine, shutdown_engine=False)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(engine: AsyncLLMEngine) -> Iterator[str]:
    keys = {ADMIN: KeyScope(frozenset({"*"}), admin=True), TENANT: KeyScope(frozenset({"legal"}), base=False)}
    with running(build_app(engine, keys=keys, shutdown_engine=False)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def complete(url: str, model: str, n: int = 1, key: str = ADMIN, max_tokens: int = 8) -> None:
    """n completions on `model`, concurrently (they share decode steps)."""
    def one(i: int) -> None:
        r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": model, "prompt": f"Item {i}: the capital of France is", "max_tokens": max_tokens,
                             "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def cell(page: Any, tenant: str, column: str) -> str:
    """The text of a tenant's cell, by the column's header label."""
    return page.evaluate(
        """([tenant, column]) => {
             const heads = [...document.querySelectorAll('#tenants th')].map((th) => th.textContent);
             const row = document.querySelector(`#tenants tr[data-tenant="${tenant}"]`);
             return row ? row.cells[heads.indexOf(column)].textContent : null;
           }""", [tenant, column])


def poll_until(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until check() held; fails after `within` seconds naming `what`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def open_page(browser: Any, url: str, errors: list[str] | None = None, dark: bool = False) -> Any:
    page = browser.new_page(viewport=VIEW, color_scheme="dark" if dark else "light")
    if errors is not None:
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/dashboard")
    return page


def test_page_loads_without_console_errors(browser: Any, open_url: str) -> None:
    errors: list[str] = []
    page = open_page(browser, open_url, errors)
    page.wait_for_selector(f'#tenants tr[data-tenant="{BASE}"]')
    assert page.locator("#model-id").inner_text().startswith(BASE)
    # No traffic yet: the base model's row only (an adapter's row comes with its first request).
    assert page.locator("#tenants tbody tr").count() == 1
    assert page.locator("#login").is_hidden() and page.locator("#p-slots").is_visible()
    page.wait_for_timeout(1500)  # at least one more poll and redraw
    assert errors == []
    page.close()


def test_traffic_to_two_adapters_shows_within_2s(browser: Any, open_url: str) -> None:
    page = open_page(browser, open_url)
    page.wait_for_selector(f'#tenants tr[data-tenant="{BASE}"]')
    assert cell(page, "legal", "requests") is None and cell(page, "sql", "requests") is None
    complete(open_url, "legal", n=3)
    complete(open_url, "sql", n=2)
    poll_until(lambda: (cell(page, "legal", "requests"), cell(page, "sql", "requests")) == ("3", "2"),
               2.0, "both tenants' rows with their request counts")
    for t in ("legal", "sql"):
        assert float(cell(page, t, "tok/s")) > 0 and cell(page, t, "TTFT p50") != "–"
    # Sortable: by requests, most first; a second click reverses.
    order = "rs => rs.map(r => r.dataset.tenant)"
    page.click("#tenants th[data-key=requests]")
    assert page.locator("#tenants tbody tr").evaluate_all(order) == ["legal", "sql", BASE]
    page.click("#tenants th[data-key=requests]")
    assert page.locator("#tenants tbody tr").evaluate_all(order) == [BASE, "sql", "legal"]
    # Without keys the fair share's tenants are the adapters: their shares of the last minute sum to 100%.
    shares = dict(page.locator("#shares tbody tr").evaluate_all(
        "rs => rs.map(r => [r.dataset.tenant, r.cells[4].textContent])"))
    assert {"legal", "sql"} <= set(shares) and 97 <= sum(int(s.rstrip("%")) for s in shares.values()) <= 103  # rounded
    # The batch chart drew the steps; the device slots show who ran.
    assert page.locator("#batch-chart rect").count() > 0
    assert {"legal", "sql"} <= set(page.locator("#slots tr[data-adapter]").evaluate_all("rs => rs.map(r => r.dataset.adapter)"))
    page.close()


def test_stats_json_counts_what_ran(open_url: str) -> None:
    """/v1/stats is what the page shows: the requests sent, the tokens decoded per adapter, no row for a 404."""
    before = {t["tenant"]: t for t in httpx.get(open_url + "/v1/stats").json()["tenants"]}
    start = time.time()
    complete(open_url, "sql", n=2, max_tokens=5)
    r = httpx.post(open_url + "/v1/completions", json={"model": "nobody", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    s = httpx.get(open_url + "/v1/stats").json()
    tenants = {t["tenant"]: t for t in s["tenants"]}
    # The rows are the base model's and those of tenants with traffic (the earlier tests' and this one's): poetry
    # has had none, and the unknown name made no row. Alone or after the browser tests, the same check holds.
    assert set(tenants) == {BASE, "sql"} | set(before) and not {"poetry", "nobody"} & set(tenants)
    before.setdefault("sql", {"requests": 0, "output_tokens": 0})  # when this test runs alone
    assert tenants["sql"]["requests"] - before["sql"]["requests"] == 2
    assert tenants["sql"]["output_tokens"] - before["sql"]["output_tokens"] == 10
    steps = [step for step in s["batch"]["steps"] if step["t"] >= start]
    # Each request's first token comes from its prefill step, the other 4 from decode steps.
    assert sum(step["tokens"].get("sql", {}).get("decode", 0) for step in steps) == 8
    assert sum(step["tokens"].get("sql", {}).get("prefill", 0) for step in steps) > 0
    assert s["model"]["memory"]["adapter_slots"] == 3 and s["adapters"]["host"]["capacity"] == 4
    assert [d["name"] for d in s["adapters"]["disk"]] == ["legal", "poetry", "sql"]


def test_promotion_on_the_page_shows_the_new_version(browser: Any, open_url: str, adapters: dict[str, Path]) -> None:
    r = httpx.post(open_url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "poetry", "lora_path": str(adapters["poetry-v2"]), "promote": False})
    assert r.status_code == 200 and r.json()["version"] == "2"
    page = open_page(browser, open_url)
    row = page.locator('#disk tr[data-adapter="poetry"]')
    row.locator("select.promote-version option[value='2']").wait_for(state="attached")
    assert row.locator("td.current").inner_text() == "1"
    row.locator("select.promote-version").select_option("2")
    row.locator("button.promote").click()
    poll_until(lambda: row.locator("td.current").inner_text() == "2", 2.0, "the promoted version on the page")
    models = {m["id"]: m for m in httpx.get(open_url + "/v1/models").json()["data"]}
    assert models["poetry"]["version"] == "2"  # the page went through the admin route
    complete(open_url, "poetry", n=1)
    slot = page.locator('#slots tr[data-adapter="poetry"] td.version')
    poll_until(lambda: slot.count() == 1 and slot.inner_text() == "2", 2.0, "version 2 in a device slot")
    page.close()


def test_keys_file_requires_a_key(browser: Any, keyed_url: str) -> None:
    assert httpx.get(keyed_url + "/v1/stats").status_code == 401
    page = open_page(browser, keyed_url)
    page.wait_for_selector("#login", state="visible")
    assert page.locator("#main").is_hidden()
    page.fill("#key", "sk-wrong")
    page.click("#login button")
    page.wait_for_selector("#login-error:has-text('invalid API key')")
    assert page.locator("#main").is_hidden()
    # A tenant key: its own tenant's row only, and no panel that names other tenants.
    complete(keyed_url, "legal", key=TENANT)
    complete(keyed_url, "sql")
    page.fill("#key", TENANT)
    page.click("#login button")
    page.wait_for_selector('#tenants tr[data-tenant="legal"]')
    assert page.locator("#tenants tbody tr").count() == 1 and page.locator("#scope").inner_text() == "tenant view"
    assert page.locator("#p-slots").is_hidden() and page.locator("#p-batch").is_hidden()
    tenant_json = httpx.get(keyed_url + "/v1/stats", headers={"Authorization": f"Bearer {TENANT}"}).json()
    assert [t["tenant"] for t in tenant_json["tenants"]] == ["legal"] and "adapters" not in tenant_json
    # Its fair-share row is its key's own (by id), without the shares that count the other tenants' traffic.
    assert page.locator("#shares tbody tr").evaluate_all("rs => rs.map(r => r.dataset.tenant)") == [key_id(TENANT)]
    assert page.locator("#shares tbody tr td").nth(4).inner_text() == "–"
    # The admin key: everything; the key stays in the tab's session storage, never in the URL.
    page.click("#logout")
    page.fill("#key", ADMIN)
    page.click("#login button")
    page.wait_for_selector(f'#tenants tr[data-tenant="{BASE}"]')
    shown = page.locator("#tenants tbody tr").evaluate_all("rs => rs.map(r => r.dataset.tenant)")
    assert sorted(shown) == sorted([BASE, "legal", "sql"])
    keys = page.locator("#shares tbody tr").evaluate_all("rs => rs.map(r => r.dataset.tenant)")
    assert sorted(keys) == sorted([key_id(TENANT), key_id(ADMIN)])
    assert page.locator("#p-slots").is_visible() and page.locator("#scope").inner_text() == "admin"
    assert ADMIN not in page.url and page.evaluate("sessionStorage.getItem('loraplex.key')") == ADMIN
    page.close()


def test_screenshots(browser: Any, open_url: str, tmp_path: Path) -> None:
    """The screenshots of README.md and docs/dashboard.md (full page at 1280x800), taken while four tenants
    decode in the same batches."""
    out = Path(os.environ.get("LORAPLEX_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    light, dark = open_page(browser, open_url), open_page(browser, open_url, dark=True)
    traffic = [threading.Thread(target=complete, args=(open_url, m, 3), kwargs={"max_tokens": 40})
               for m in ("legal", "sql", BASE, "poetry")]
    for t in traffic:
        t.start()
    poll_until(lambda: light.locator("#batch-facts dd").nth(1).inner_text() != "0", 30, "requests running on the page")
    light.wait_for_timeout(1500)  # a second of steps in the chart
    for page, name in ((light, "dashboard.png"), (dark, "dashboard-dark.png")):
        page.screenshot(path=str(out / name), full_page=True)
        assert (out / name).stat().st_size > 20_000
    for t in traffic:
        t.join()
    light.close()
    dark.close()
