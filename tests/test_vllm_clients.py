"""Real clients against a server started with vLLM's own command line (`python -m
loraplex.entrypoints.openai.api_server --model ... --enable-lora --lora-modules '{json}' --enforce-eager`, with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): lineage, runtime loads and their errors through curl, ten adapters used at
once through a 2-entry CPU cache, bad loads during good traffic, beam search with an adapter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import ATTN
from server_util import dies_with_this_process, free_port, stop, wait_up

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BASE = "SmolLM2-135M-Instruct"
KEY = "sk-vllm-admin"
HI = [{"role": "user", "content": "Say something about the sea."}]
TENANTS = [f"t{i}" for i in range(10)]


@pytest.fixture(scope="module")
def made(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The adapters: a start-up one, ten tenants, and bad ones (over the rank limit, a config that is not JSON,
    a config whose r is not the weights' rank)."""
    found = {"a0": adapter_factory("vc_a0", r=8, targets=ATTN, seed=40)}
    for i, name in enumerate(TENANTS):
        found[name] = adapter_factory(f"vc_{name}", r=4 + (i % 2) * 4, targets=ATTN, seed=41 + i)
    found["rank16"] = adapter_factory("vc_rank16", r=16, targets=ATTN, seed=60)
    root = tmp_path_factory.mktemp("vc_bad")
    found["unreadable"] = shutil.copytree(found["t0"], root / "unreadable")
    (found["unreadable"] / "adapter_config.json").write_text("{\"r\": 4, ")
    found["wrong_r"] = shutil.copytree(found["t0"], root / "wrong_r")
    cfg = json.loads((found["t0"] / "adapter_config.json").read_text())
    (found["wrong_r"] / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1024}))
    return found


@pytest.fixture(scope="module")
def url(made: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    module = json.dumps({"name": "a0", "path": str(made["a0"]), "base_model_name": BASE})
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.entrypoints.openai.api_server", "--model", BASE, "--port", str(port),
         "--enable-lora", "--lora-modules", module, "--max-lora-rank", "8", "--max-loras", "2",
         "--max-cpu-loras", "2", "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
         "--disable-log-requests", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=dies_with_this_process,
        env={**os.environ, "VLLM_API_KEY": KEY, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"})
    try:
        wait_up(f"http://127.0.0.1:{port}", proc, within=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def curl(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST with curl, as an operator's script does: the status and the JSON answer."""
    out = subprocess.run(["curl", "-sS", "-X", "POST", url + path, "-H", f"Authorization: Bearer {KEY}",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body), "-w", "\n%{http_code}"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text) if text.strip().startswith("{") else {"text": text}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def answer(url: str, model: str) -> str:
    out = client(url).chat.completions.create(model=model, messages=HI, max_tokens=6, temperature=0)
    return out.choices[0].message.content or ""


def test_lineage_in_models(url: str, made: dict[str, Path]) -> None:
    models = {m.id: m.model_extra for m in client(url).models.list().data}
    assert models["a0"]["parent"] == BASE and models["a0"]["root"] == str(made["a0"])
    assert models[BASE]["parent"] is None and models[BASE]["root"]


@pytest.mark.parametrize(("case", "status", "code", "words"), [
    ("missing", 404, "model_not_found", ["does not exist"]),
    ("unreadable", 400, "invalid_adapter", ["adapter_config.json is not valid JSON"]),
    ("rank16", 400, "adapter_rank_exceeded", ["rank 16", "--max-lora-rank 8"]),
    ("wrong_r", 400, "invalid_adapter", ["r = 1024", "rank 4"]),
])
def test_runtime_load_errors(url: str, made: dict[str, Path], case: str, status: int, code: str,
                             words: list[str]) -> None:
    """Each bad runtime load gets its status and code, naming its cause (both ranks where there are two)."""
    path = made.get(case, made["a0"].parent / "no-such-adapter")
    got, body = curl(url, "/v1/load_lora_adapter", {"lora_name": f"bad-{case}", "lora_path": str(path)})
    assert got == status and body["error"]["code"] == code, body
    assert all(w in body["error"]["message"] for w in words), body
    assert f"bad-{case}" not in {m.id for m in client(url).models.list().data}


def test_ten_adapters_at_once_through_a_two_entry_cpu_cache(url: str, made: dict[str, Path]) -> None:
    """Ten runtime loads, then all ten used at once (with the base model) on 2 device slots and 2 CPU-cache entries:
    each answer is the one it gets alone."""
    for name in TENANTS:
        status, body = curl(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(made[name])})
        assert status == 200, body
    alone = {name: answer(url, name) for name in [*TENANTS, BASE]}
    assert len(set(alone.values())) > 5  # the adapters differ, else the equality below proves little
    with ThreadPoolExecutor(len(alone)) as pool:
        together = dict(zip(alone, pool.map(lambda n: answer(url, n), alone)))
    assert together == alone


def test_bad_loads_during_good_traffic_break_nothing(url: str, made: dict[str, Path]) -> None:
    names = ["a0", "t1", "t2", BASE]
    for name in ("t1", "t2"):
        curl(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(made[name])})
    alone = {name: answer(url, name) for name in names}
    bad = [{"lora_name": "x1", "lora_path": str(made["rank16"])},
           {"lora_name": "x2", "lora_path": str(made["unreadable"])},
           {"lora_name": "x3", "lora_path": "/no/such/adapter"},
           {"lora_name": "../escape", "lora_path": str(made["t3"])},
           {"lora_name": "x4", "lora_path": str(made["wrong_r"])}]
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(answer, url, name) for name in names * 3]
        refused = [curl(url, "/v1/load_lora_adapter", b)[0] for b in bad * 2]
        assert [f.result() for f in good] == [alone[n] for n in names * 3]
    assert all(400 <= s < 500 for s in refused), refused
    assert {m.id for m in client(url).models.list().data}.isdisjoint({"x1", "x2", "x3", "x4"})


def test_beam_search_with_an_adapter(url: str) -> None:
    """vLLM's beam search through the openai client: n distinct beams of the adapter, best first, on its version;
    a width of 1 is the greedy answer."""
    chat = client(url).chat.completions.create(model="a0", messages=HI, n=3, max_tokens=6, temperature=0,
                                               extra_body={"use_beam_search": True})
    texts = [c.message.content for c in chat.choices]
    assert len(set(texts)) == 3 and chat.system_fingerprint == "a0@1"
    one = client(url).completions.create(model="a0", prompt="The sea is", n=1, max_tokens=5, temperature=0,
                                         extra_body={"use_beam_search": True, "length_penalty": 1.0})
    greedy = client(url).completions.create(model="a0", prompt="The sea is", max_tokens=5, temperature=0)
    assert one.choices[0].text == greedy.choices[0].text
