"""The offline Python API in vLLM's shape: generate(prompts, sampling_params, lora_request=LoRARequest(...),
use_tqdm=...), chat() of one conversation or many, vLLM's engine keywords; loraplex's own keywords beside them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from conftest import ATTN
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import AdapterNotFoundError

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapters(adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {n: adapter_factory(f"offline_{n}", r=8, alpha=32, targets=ATTN, seed=70 + i) for i, n in enumerate("ab")}


@pytest.fixture(scope="module")
def llm(adapters: dict[str, Path]) -> Iterator[LLM]:
    # vLLM's keywords a vLLM script passes, each accepted for its reason.
    yield LLM(dtype="float32", max_model_len=256, kv_cache_memory=32 << 20, lora_modules={"a": str(adapters["a"])},
              enable_lora=True, enforce_eager=True, tensor_parallel_size=1, trust_remote_code=True,
              disable_log_stats=True, max_lora_rank=8)


def tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_lora_request_is_the_adapter_at_its_path(llm: LLM, adapters: dict[str, Path]) -> None:
    """LoRARequest(name, id, path) runs the adapter at that path: the same tokens as the registered name, not the
    base model's; a list gives one per prompt (None: the base model)."""
    prompt = llm.apply_chat_template(HI)
    by_name = tokens(llm.generate([prompt], GREEDY, adapters="a", use_tqdm=False))
    base = tokens(llm.generate([prompt], GREEDY, use_tqdm=False))
    req_a = LoRARequest("a_again", 1, str(adapters["a"]))
    by_request = tokens(llm.generate([prompt], sampling_params=GREEDY, lora_request=req_a, use_tqdm=False))
    assert by_request == by_name and by_name != base
    req_b = LoRARequest("b", 2, str(adapters["b"]))
    mixed = tokens(llm.generate([prompt] * 3, GREEDY, lora_request=[req_b, None, req_a], use_tqdm=False))
    alone_b = tokens(llm.generate(prompt, GREEDY, lora_request=req_b, use_tqdm=False))
    assert mixed == [alone_b[0], base[0], by_name[0]] and alone_b[0] not in (base[0], by_name[0])


def test_one_id_names_one_adapter(llm: LLM, adapters: dict[str, Path]) -> None:
    llm.generate("Hi", GREEDY, lora_request=LoRARequest("c", 7, str(adapters["a"])), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id 7 is adapter 'c'.*one id per adapter"):
        llm.generate("Hi", GREEDY, lora_request=LoRARequest("c", 7, str(adapters["b"])), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id must be an integer > 0, got 0"):
        LoRARequest("c", 0, str(adapters["a"]))
    with pytest.raises(AdapterNotFoundError):
        llm.generate("Hi", GREEDY, lora_request=LoRARequest("gone", 8, "/no/such/adapter"), use_tqdm=False)


def test_prompt_forms(llm: LLM) -> None:
    """A string, token ids, vLLM's prompt dicts: one prompt each, one output each."""
    ids = llm.tokenizer.encode("Hello there")
    outs = [llm.generate(p, GREEDY, use_tqdm=False) for p in ("Hello there", ids, {"prompt": "Hello there"},
                                                              {"prompt_token_ids": ids})]
    assert all(len(o) == 1 for o in outs)
    assert len({tuple(o[0].outputs[0].token_ids) for o in outs}) == 1
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "x", "multi_modal_data": {}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt: 2 prompts, 3 given"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)


def test_use_tqdm(llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm.generate(["Hi", "Yo"], GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate(["Hi", "Yo"], GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""
    made: list[int] = []

    class Bar(tqdm):  # type: ignore[misc]
        def update(self, n: float | None = 1) -> bool | None:
            made.append(int(n or 0))
            return super().update(n)

    llm.generate(["Hi", "Yo", "Hey"], GREEDY, use_tqdm=Bar)
    assert made == [1, 1, 1]


def test_chat_one_conversation_or_many(llm: LLM) -> None:
    one = llm.chat(HI, GREEDY, use_tqdm=False)
    many = llm.chat([HI, [{"role": "user", "content": "Name a colour."}]], GREEDY, lora_request=[None, None],
                    use_tqdm=False)
    assert len(one) == 1 and len(many) == 2 and tokens(one)[0] == tokens(many)[0]
    assert one[0].prompt_token_ids == llm.apply_chat_template(HI)
    template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant>"
    custom = llm.chat(HI, GREEDY, chat_template=template, use_tqdm=False)[0]
    assert llm.tokenizer.decode(custom.prompt_token_ids) == "<user> What is the capital of France?\n<assistant>"
    adapted = llm.chat(HI, GREEDY, adapters="a", use_tqdm=False)
    assert tokens(adapted) != tokens(one)


def test_the_older_keywords_still_work(llm: LLM) -> None:
    """generate(prompts, sampling=..., adapters=...) and the positional (prompts, params, names) of earlier code."""
    prompt = llm.apply_chat_template(HI)
    new = tokens(llm.generate([prompt, prompt], GREEDY, lora_request=[None, None], use_tqdm=False))
    assert tokens(llm.generate([prompt, prompt], sampling=GREEDY, adapters=[None, "a"], use_tqdm=False))[0] == new[0]
    assert tokens(llm.generate([prompt], GREEDY, ["a"], use_tqdm=False)) == tokens(
        llm.generate([prompt], GREEDY, adapters="a", use_tqdm=False))
    with pytest.raises(ValueError, match="not both"):
        llm.generate([prompt], GREEDY, sampling=GREEDY)
    with pytest.raises(ValueError, match="not both"):
        llm.generate([prompt], GREEDY, adapters="a", lora_request=LoRARequest("a", 1, "/x"))


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"tensor_parallel_size": 2}, ValueError, r"LLM\(tensor_parallel_size=2\) is refused: loraplex runs one engine"),
    ({"tokenizer": "other"}, ValueError, r"LLM\(tokenizer='other'\) is refused: loraplex uses the model directory"),
    ({"no_such_setting": 1}, TypeError, "no_such_setting"),
])
def test_vllm_engine_keywords_refused_by_name(kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    """Refused before any model is loaded."""
    with pytest.raises(error, match=text):
        LLM(**kwargs)
