"""Every bad input gets its own error type naming the cause, and requests already running finish unharmed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from conftest import ATTN
from loraplex.training.synthetic import random_adapter
from loraplex import LLM, SamplingParams
from loraplex.engine.admin import Register
from loraplex.errors import (
    AdapterFormatError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterRankError,
    InvalidRequestError,
    PromptTooLongError,
    UnsupportedAdapterFeatureError,
)


@pytest.fixture(scope="module")
def good(adapter_factory: Callable[..., Path]) -> Path:
    return adapter_factory("good", r=8, alpha=16, targets=ATTN, seed=7)


@pytest.fixture(scope="module")
def llm(good: Path) -> LLM:
    return LLM(dtype="float32", max_lora_rank=8, max_loras=2, max_model_len=256, lora_modules={"good": str(good)})


def _peft(hf_base: torch.nn.Module, out: Path, config: object) -> Path:
    from peft import get_peft_model

    model = get_peft_model(hf_base, config)  # type: ignore[arg-type]
    try:
        model.save_pretrained(out)
    finally:
        model.unload()
    return out


@pytest.fixture(scope="module")
def bad_adapters(good: Path, hf_base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import IA3Config, LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    pickled = root / "pickled"
    shutil.copytree(good, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    from safetensors.torch import save_file

    nan = root / "nan"  # a diverged training run: NaN in one tensor
    shutil.copytree(good, nan)
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    config_rank = root / "config_rank"  # the config says r = 1024 over rank-8 tensors: PEFT cannot load it either
    shutil.copytree(good, config_rank)
    cfg = json.loads((config_rank / "adapter_config.json").read_text())
    (config_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1024}))
    pattern_rank = root / "pattern_rank"  # the same through rank_pattern, by PEFT's qualified module name
    shutil.copytree(good, pattern_rank)
    (pattern_rank / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"self_attn.v_proj": 2}}))
    return {
        "config_rank": config_rank,
        "pattern_rank": pattern_rank,
        "corrupt": corrupt,
        "other_base": random_adapter(tiny, root / "other_base", r=4, targets=ATTN),
        "rank16": random_adapter(hf_base, root / "rank16", r=16, targets=ATTN),
        "dora": _peft(hf_base, root / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)),
        "modules_to_save": _peft(hf_base, root / "mts", LoraConfig(r=4, target_modules=["q_proj"],
                                                                    modules_to_save=["lm_head"])),
        "embedding": _peft(hf_base, root / "emb", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
        "ia3": _peft(hf_base, root / "ia3", IA3Config(target_modules=["k_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"])),
        "pickled": pickled,
        "nan": nan,
    }


CASES = [
    ("missing", AdapterNotFoundError, "does not exist"),
    ("corrupt", AdapterFormatError, "corrupt safetensors"),
    ("other_base", AdapterIncompatibleError, "different base model"),
    ("rank16", AdapterRankError, "--max-lora-rank 16"),
    ("dora", UnsupportedAdapterFeatureError, "DoRA"),
    ("modules_to_save", UnsupportedAdapterFeatureError, "modules_to_save"),
    ("embedding", UnsupportedAdapterFeatureError, "embedding LoRA"),
    ("ia3", UnsupportedAdapterFeatureError, "PEFT method IA3"),
    ("pickled", AdapterFormatError, "safetensors is required"),
    ("nan", AdapterFormatError, "NaN or infinite weights"),
    ("config_rank", AdapterFormatError, r"adapter_config.json says r = 1024 for model\.layers\.0\.self_attn\.\w+, but "
     "its lora_A has rank 8"),
    ("pattern_rank", AdapterFormatError, r"says rank_pattern\['self_attn.v_proj'\] = 2 for model\.layers\.0\.self_attn"
     r"\.v_proj, but its lora_A has rank 8"),
]


@pytest.mark.parametrize(("case", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_rejected_while_serving(llm: LLM, bad_adapters: dict[str, Path], tmp_path: Path,
                                            case: str, error: type[Exception], message: str) -> None:
    """A bad adapter is refused with its own error; a request running meanwhile finishes with its solo tokens."""
    engine = llm.engine
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate([prompt], params, adapters=["good"])[0].outputs[0].token_ids

    engine.add_request(prompt, params, "good", request_id="inflight")
    engine.step()
    path = bad_adapters.get(case, tmp_path / "no-such-adapter")
    with pytest.raises(error, match=message):
        engine.admin(Register(case, path))
    assert case not in engine.adapters.registry.entries  # nothing half-registered
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and final.outputs[0].token_ids == alone


def test_pickled_adapter_loads_with_opt_in(bad_adapters: dict[str, Path], good: Path) -> None:
    """adapter_model.bin is accepted only with allow_pickle_adapters=True, and then serves like the original."""
    llm = LLM(dtype="float32", max_lora_rank=8, allow_pickle_adapters=True, max_model_len=256,
              lora_modules={"pickled": str(bad_adapters["pickled"]), "good": str(good)})
    prompt = llm.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], params, adapters=["pickled", "good"])
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_an_unreadable_config_is_a_format_error(llm: LLM, good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config the server may not read (permissions, an I/O error) is the adapter's error, naming the file and
    the cause, never a 500 (the tests run as root, where chmod cannot make a file unreadable: the read fails here)."""
    read = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name == "adapter_config.json" and self.parent == good:
            raise PermissionError(13, "Permission denied")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(AdapterFormatError, match="cannot read adapter_config.json: Permission denied"):
        llm.register_adapter("unreadable", str(good))


def test_unknown_adapter_name(llm: LLM) -> None:
    """A request for an adapter nobody registered gets AdapterNotFoundError listing the registered ones."""
    with pytest.raises(AdapterNotFoundError, match="adapter 'nope' not found: it is not registered"):
        llm.generate(["hi"], adapters=["nope"])
    assert not llm.engine.has_unfinished_requests()


def test_prompt_too_long(llm: LLM) -> None:
    """A prompt longer than the context gets PromptTooLongError with both lengths; nothing is queued."""
    with pytest.raises(PromptTooLongError, match="300 tokens; the context .* 256"):
        llm.generate([[1] * 300])
    assert not llm.engine.has_unfinished_requests()


def test_bad_sampling_and_empty_prompt(llm: LLM) -> None:
    """Out-of-range sampling parameters and empty prompts are InvalidRequestError naming the parameter."""
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])


# ---- tool-calling shapes that were 500s: now a 400 naming the field, or accepted as vLLM accepts them ----------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tool_server() -> Iterator[tuple[str, str]]:
    from loraplex import EngineConfig
    from loraplex.engine.async_engine import AsyncLLMEngine
    from loraplex.server.app import build_app
    from server_util import running

    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=512, kv_cache_memory=32 << 20))
    with running(build_app(engine)) as url:
        yield url, engine.facts.model_name


def test_tool_choice_function_as_a_string_is_a_400_naming_the_shape(tool_server: tuple[str, str]) -> None:
    """{"type": "function", "function": "get_weather"} (the name where OpenAI wants {"name": ...}) was a 500."""
    import httpx

    url, model = tool_server
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 4,
        "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": "get_weather"}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tool_choice" and '"function": {"name": ...}' in error["message"]


def test_assistant_tool_call_arguments_as_an_object_are_accepted_like_json_text(tool_server: tuple[str, str]) -> None:
    """An earlier call's `arguments` sent as an object (vLLM accepts it; was a 500 here) renders the same prompt as
    the same arguments sent as JSON text; arguments that are neither are a 400 naming the field."""
    import httpx

    url, model = tool_server

    def history(arguments: object) -> list[dict[str, object]]:
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]

    as_object = httpx.post(url + "/tokenize", json={"messages": history({"city": "Oslo"})}, timeout=60)
    as_text = httpx.post(url + "/tokenize", json={"messages": history('{"city": "Oslo"}')}, timeout=60)
    assert as_object.status_code == 200, as_object.text
    assert as_object.json()["tokens"] == as_text.json()["tokens"]
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": history({"city": "Oslo"}), "tools": [WEATHER_TOOL], "max_tokens": 2})
    assert r.status_code == 200, r.text
    for bad, needle in ((42, "must be JSON text or an object, got int"), ("{city", "is not valid JSON")):
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": history(bad), "tools": [WEATHER_TOOL], "max_tokens": 2})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
