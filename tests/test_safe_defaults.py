"""Safe by default and bounded before work (docs/security.md): a keyless server binds loopback only; the Host
header must name the server; runtime loads read only from the adapter roots; with keys, every route but /health
and the dashboard page needs one (before its body is read), /metrics the admin or metrics scope; bodies are
capped (Content-Length and chunked) and timed; each key has its own prefix-cache namespace unless its keys-file
entry shares a cache_group; the keys file is strict. After each refusal the server serves everyone else."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import loraplex
from conftest import ATTN
from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.errors import InvalidRequestError
from loraplex.server.app import build_app
from loraplex.server.auth import load_keys
from loraplex.server.guard import GuardConfig, allowed_hosts, host_name
from loraplex.server.serve import uvicorn_limits
from server_util import running

ADMIN, ALICE, BOB, CAROL, PROM = "sk-admin", "sk-alice", "sk-bob", "sk-carol", "sk-prom"
KEYS_FILE = {"keys": {ADMIN: {"adapters": ["*"], "admin": True}, ALICE: {"adapters": ["shared"]},
                      BOB: {"adapters": ["shared"]}, CAROL: {"adapters": ["shared"], "cache_group": "team"},
                      "sk-dave": {"adapters": ["shared"], "cache_group": "team"},
                      PROM: {"adapters": [], "base": False, "metrics": True}}}
BASE = "SmolLM2-135M-Instruct"
MAX_BODY = 64 * 1024
LONG = [{"role": "user", "content": "Summarise the tenant isolation test, " + "over and over, " * 40}]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("safe")
    store, outside = work / "store", work / "outside"
    store.mkdir(), outside.mkdir()
    source = adapter_factory("safe_shared", r=4, targets=ATTN, seed=901)
    keys_path = work / "keys.json"
    keys_path.write_text(json.dumps(KEYS_FILE))
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=(("shared", str(source)),), max_model_len=512))
    app = build_app(engine, keys=load_keys(keys_path), adapter_roots=[store],
                    guard=GuardConfig(allowed_hosts("127.0.0.1"), MAX_BODY, body_timeout=1.0))
    with running(app, **uvicorn_limits(ServerConfig(header_timeout=1.0, limit_concurrency=64))) as url:
        yield {"url": url, "store": store, "outside": outside, "source": source}


def _chat(url: str, key: str, messages: list = LONG) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=_auth(key), timeout=60,
                      json={"model": "shared", "messages": messages, "max_tokens": 2, "temperature": 0})


def _still_serving(url: str) -> None:
    r = _chat(url, ALICE, [{"role": "user", "content": "Hi"}])
    assert r.status_code == 200, r.text


# ---- keyless servers bind loopback only ---------------------------------------------------------------------------
def test_a_keyless_server_refuses_a_public_address() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        ServerConfig(host=host)  # the README's first command: loopback, no keys
    with pytest.raises(InvalidRequestError, match="--insecure-no-api-keys"):
        ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", insecure_no_api_keys=True)
    ServerConfig(host="0.0.0.0", api_keys=Path("keys.json"))


@pytest.mark.parametrize("command", ["serve", "cluster"])
def test_the_cli_refuses_before_loading_anything(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "loraplex.cli", command, "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.returncode != 0 and "--insecure-no-api-keys" in done.stderr, done.stderr[-2000:]


# ---- Host header ----------------------------------------------------------------------------------------------------
def test_host_names() -> None:
    assert host_name("localhost:8000") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("Example.COM") == "example.com" and host_name("::1") == "::1"
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("0.0.0.0", ["api.example.com"]) == {"api.example.com"}
    assert allowed_hosts("10.0.0.5", ["*"]) is None and allowed_hosts("10.0.0.5") == {"10.0.0.5"}


def test_a_foreign_host_header_is_refused(served: dict) -> None:
    """DNS rebinding: a page on evil.example resolves its name to 127.0.0.1; its requests carry its Host."""
    url = served["url"]
    r = httpx.get(url + "/v1/models", headers={**_auth(ADMIN), "Host": "evil.example"})
    assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]["message"]
    port = url.rsplit(":", 1)[1]
    assert httpx.get(url + "/v1/models", headers={**_auth(ADMIN), "Host": f"localhost:{port}"}).status_code == 200
    _still_serving(url)


# ---- runtime loads confined to the adapter roots -------------------------------------------------------------------
def test_runtime_loads_read_only_from_the_adapter_roots(served: dict) -> None:
    url, store, outside, source = served["url"], served["store"], served["outside"], served["source"]
    inside = store / "mine"
    _copy(source, inside)
    escape = store / "escape"
    escape.symlink_to(outside, target_is_directory=True)
    _copy(source, outside / "theirs")
    for path in (outside / "theirs", escape / "theirs", store / ".." / "outside" / "theirs", Path("/etc")):
        r = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(ADMIN),
                       json={"lora_name": "x", "lora_path": str(path)})
        assert r.status_code == 403 and "--allowed-adapter-roots" in r.json()["error"]["message"], (path, r.text)
    r = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(ADMIN), json={"lora_name": "mine", "lora_path": str(inside)})
    assert r.status_code == 200, r.text
    _still_serving(url)


def _copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


# ---- keys before anything ------------------------------------------------------------------------------------------
def test_every_route_but_health_needs_a_key(served: dict) -> None:
    url = served["url"]
    for method, path, body in [("GET", "/metrics", None), ("GET", "/v1/stats", None), ("GET", "/v1/models", None),
                               ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("POST", "/v1/chat/completions", {"model": "shared", "messages": LONG})]:
        r = httpx.request(method, url + path, json=body)
        assert r.status_code == 401, (path, r.status_code)
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}, headers=_auth(ALICE)).status_code == 200


def test_metrics_need_the_admin_or_metrics_scope(served: dict) -> None:
    url = served["url"]
    assert httpx.get(url + "/metrics", headers=_auth(ALICE)).status_code == 403
    for key in (ADMIN, PROM):
        r = httpx.get(url + "/metrics", headers=_auth(key))
        assert r.status_code == 200 and "loraplex_requests_total" in r.text


def test_the_key_is_checked_before_the_body(served: dict) -> None:
    """No key: a malformed body, or one declared larger than the cap, is a 401, never parsed or read."""
    url = served["url"]
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=_auth(ALICE))
    assert r.status_code == 400  # with a key, the same body is the client's malformed JSON


# ---- bodies bounded ------------------------------------------------------------------------------------------------
def test_a_body_over_the_cap_is_a_413(served: dict) -> None:
    url = served["url"]
    big = {"model": "shared", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers=_auth(ALICE))
    assert r.status_code == 413 and "--max-body-size" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it is read
        yield b'{"model": "shared", "messages": [{"role": "user", "content": "'
        for _ in range(2 * MAX_BODY // 4096):
            yield b"x" * 4096
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers=_auth(ALICE))
    assert r.status_code == 413 and "--max-body-size" in r.json()["error"]["message"]
    _still_serving(url)


def test_a_body_that_does_not_arrive_is_a_408(served: dict) -> None:
    """A slow client declares a body and sends part of it: it gets a 408 after --body-timeout, not a held worker."""
    host, port = served["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":".encode())
        t0 = time.monotonic()
        reply = s.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 8, reply[:300]
    _still_serving(served["url"])


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a"])
def test_headers_that_do_not_arrive_are_a_408(served: dict, sent: bytes) -> None:
    """Slowloris: a connection that sends nothing, or a header it never finishes, is answered 408 (naming
    --header-timeout) and closed after the deadline (1 s here), so idle sockets cannot fill --limit-concurrency;
    other clients are served all along."""
    host, port = served["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(sent)
        _still_serving(served["url"])  # while the slow one hangs
        start = time.monotonic()
        reply = s.recv(4096)
        assert b"408" in reply.split(b"\r\n", 1)[0] and b"--header-timeout" in reply, reply
        assert time.monotonic() - start < 5
        assert s.recv(4096) == b""  # closed
    _still_serving(served["url"])


def test_a_kept_alive_connection_is_not_cut_by_the_header_deadline(served: dict) -> None:
    """The deadline counts from each request's first byte: one client reusing a connection past it is fine."""
    with httpx.Client(base_url=served["url"], headers=_auth(ALICE)) as client:
        for _ in range(2):
            assert client.get("/v1/models").status_code == 200
            time.sleep(0.7)  # 1.4 s on one connection, over the 1 s deadline; under the 5 s keep-alive


# ---- prefix cache per key ------------------------------------------------------------------------------------------
def test_each_key_has_its_own_prefix_cache(served: dict) -> None:
    """Alice's repeat finds her blocks; Bob, on the same adapter with the same prompt, finds none of them (his
    cached_tokens, and so his timing, say nothing of hers); Carol and Dave share a cache_group, so they share."""
    url = served["url"]

    def cached(key: str, prompt: list) -> int:
        r = _chat(url, key, prompt)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    alice = [{"role": "user", "content": "Alice: " + LONG[0]["content"]}]
    assert cached(ALICE, alice) < 96 and cached(ALICE, alice) >= 96  # (her earlier requests share the template)
    assert cached(BOB, alice) == 0  # his first request: not even the chat template's first block
    assert cached(ADMIN, alice) == 0
    team = [{"role": "user", "content": "Team: " + LONG[0]["content"]}]
    assert cached(CAROL, team) == 0 and cached("sk-dave", team) >= 96


# ---- the keys file is strict ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,field", [
    ({"adapters": ["a"], "admin": "false"}, "admin"),
    ({"adapters": "legal"}, "adapters"),
    ({"adapters": ["a"], "base": 1}, "base"),
    ({"adapters": ["a"], "admn": True}, "admn"),
    ({"adapters": ["a"], "cache_group": ""}, "cache_group"),
    ({"adapters": ["a"], "weight": 0}, "weight"),
    ({"adapters": ["a"], "weight": -1}, "weight"),
    ({"adapters": ["a"], "weight": "3"}, "weight"),
    ({"adapters": ["a"], "weight": 1001}, "weight"),
    ({"adapters": ["a"], "weight": True}, "weight"),
])
def test_the_keys_file_refuses_a_wrong_field(tmp_path: Path, spec: dict, field: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"sk-x": spec}}))
    with pytest.raises(InvalidRequestError, match=field):
        load_keys(path)


@pytest.mark.parametrize("text", ['{"keys": {}}', '{"keys": []}', '{"key": {"sk-x": {}}}', "not json", '{"keys": {" ": {}}}'])
def test_the_keys_file_refuses_a_wrong_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match="keys"):
        load_keys(path)


# ---- a tenant never sees another's name or traffic -----------------------------------------------------------------
def test_a_tenant_key_never_sees_another_tenants_name_or_traffic(served: dict) -> None:
    url, store, source = served["url"], served["store"], served["source"]
    _copy(source, store / "secret")
    r = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(ADMIN),
                   json={"lora_name": "secret-tenant", "lora_path": str(store / "secret")})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/chat/completions", headers=_auth(ADMIN), timeout=60,
                   json={"model": "secret-tenant", "messages": LONG, "max_tokens": 2})
    assert r.status_code == 200
    for path in ("/v1/models", "/v1/stats"):
        r = httpx.get(url + path, headers=_auth(ALICE))
        assert r.status_code == 200 and "secret-tenant" not in r.text, path
    models = httpx.get(url + "/v1/models", headers=_auth(ALICE)).json()["data"]
    assert [m["id"] for m in models] == [BASE, "shared"]
    assert "hits_tokens" not in models[0]["memory"]["prefix_cache"]  # cache totals count every tenant's prompts
    # Naming another tenant's adapter and naming none that exists read the same: existence is not revealed.
    seen = [httpx.post(url + "/v1/chat/completions", headers=_auth(ALICE),
                       json={"model": m, "messages": LONG, "max_tokens": 2}) for m in ("secret-tenant", "no-such")]
    assert [r.status_code for r in seen] == [403, 403]
    assert [r.json()["error"]["message"].replace("no-such", "X").replace("secret-tenant", "X") for r in seen] == \
        [seen[0].json()["error"]["message"].replace("secret-tenant", "X")] * 2


def test_retrieving_a_model_reveals_no_other_tenants_name(served: dict) -> None:
    """GET /v1/models/{id}: one entry of the caller's own list; another tenant's adapter reads as an unknown name."""
    url, store, source = served["url"], served["store"], served["source"]
    _copy(source, store / "hidden")
    assert httpx.post(url + "/v1/load_lora_adapter", headers=_auth(ADMIN),
                      json={"lora_name": "hidden-tenant", "lora_path": str(store / "hidden")}).status_code == 200
    mine = httpx.get(url + "/v1/models/shared", headers=_auth(ALICE))
    assert mine.status_code == 200 and mine.json()["id"] == "shared" and mine.json()["parent"] == BASE
    assert httpx.get(url + "/v1/models/hidden-tenant", headers=_auth(ADMIN)).status_code == 200
    seen = [httpx.get(url + f"/v1/models/{m}", headers=_auth(ALICE)) for m in ("hidden-tenant", "no-such")]
    assert [r.status_code for r in seen] == [404, 404]
    assert seen[0].text.replace("hidden-tenant", "X") == seen[1].text.replace("no-such", "X")
    assert httpx.get(url + "/v1/models/shared").status_code == 401  # a key is still needed


def test_ping_and_version_are_public_as_health_is(served: dict) -> None:
    url = served["url"]
    assert httpx.get(url + "/ping").json() == {"status": "ok"} and httpx.post(url + "/ping").status_code == 200
    assert httpx.get(url + "/version").json() == {"version": loraplex.__version__}


def _own_row(url: str, key: str, model: str) -> dict:
    body = httpx.get(url + "/v1/stats", headers=_auth(key)).json()
    assert body["scope"] == ("admin" if key == ADMIN else "tenant"), body["scope"]
    assert ("hit_rate" in body["model"]["prefix_cache"]) == (key == ADMIN)  # every key's cache hits: admin only
    rows = {r["tenant"]: r for r in body["tenants"]}
    return rows.get(model, {"requests": 0, "output_tokens": 0, "queued": 0, "running": 0})


def test_a_tenant_keys_stats_count_its_own_requests_only(served: dict) -> None:
    """Alice and Bob may both use "shared" and the base model: each key's /v1/stats rows count that key's
    requests alone (requests, tokens, in flight, cache hits), so neither learns the other's traffic from them;
    the admin's rows count both."""
    url = served["url"]
    before = {k: _own_row(url, k, "shared")["requests"] for k in (ALICE, BOB, ADMIN)}
    bob = [{"role": "user", "content": "Bob's traffic: " + LONG[0]["content"]}]
    for _ in range(3):
        assert _chat(url, BOB, bob).status_code == 200
    assert _chat(url, ALICE, [{"role": "user", "content": "Alice once"}]).status_code == 200
    alice, bobs = _own_row(url, ALICE, "shared"), _own_row(url, BOB, "shared")
    assert alice["requests"] - before[ALICE] == 1 and bobs["requests"] - before[BOB] == 3
    assert alice["queued"] == alice["running"] == 0 == bobs["queued"] == bobs["running"]
    assert bobs["prefix_cache_hit_rate"] > 0  # his repeats hit his own blocks
    admin = {r["tenant"]: r for r in httpx.get(url + "/v1/stats", headers=_auth(ADMIN)).json()["tenants"]}
    assert admin["shared"]["requests"] - before[ADMIN] >= 4
    base = _own_row(url, PROM, BASE)  # no traffic of its own (and no base scope): no row, not everyone's
    assert base["requests"] == 0


def test_a_refused_later_prompt_leaves_no_request_in_flight_on_the_stats(served: dict) -> None:
    """Completions with two prompts, the second refused by the engine (a token id past the vocabulary) after the
    first has started: a 400, and the first prompt's request is recorded as ended too, so the key's row shows
    nothing queued or running afterwards (it once stayed "running" for good)."""
    url = served["url"]
    before = _own_row(url, ALICE, "shared")
    r = httpx.post(url + "/v1/completions", headers=_auth(ALICE), timeout=60,
                   json={"model": "shared", "prompt": [[1, 2, 3], [10**7]], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"], r.text
    after = _own_row(url, ALICE, "shared")
    assert after["queued"] == after["running"] == 0, after
    assert after["requests"] - before["requests"] == 2 and after["errors"].get("400", 0) >= 2, after
    _still_serving(url)
