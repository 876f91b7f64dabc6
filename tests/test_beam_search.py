"""vLLM's beam search (use_beam_search with n): the algorithm on a hand-worked table, the served beams of an adapter
equal to the same search over PEFT's log-probabilities, beams batched with other tenants' requests changing no
answer, and the fields it cannot honour refused by name."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from conftest import ATTN
from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.beam_search import Beam, beam_search
from loraplex.server.app import build_app
from server_util import running

BASE = "SmolLM2-135M-Instruct"
EOS = 9
# The next tokens' log-probabilities after a sequence's last token (0: the prompt's).
TABLE = {0: [(1, -0.5), (2, -1.0)], 1: [(3, -1.5), (4, -1.6)], 2: [(5, -0.1), (6, -3.0)],
         3: [(EOS, -0.1), (7, -0.2)], 4: [(7, -0.1), (8, -0.2)], 5: [(EOS, -2.0), (8, -2.5)],
         6: [(8, -0.1), (7, -0.3)], 7: [(8, -0.1), (EOS, -0.2)], 8: [(7, -0.1), (EOS, -0.3)]}


async def table_step(beams: list[list[int]]) -> list[Sequence[tuple[int, float]]]:
    return [TABLE[b[-1]] for b in beams]


def search(**kw: Any) -> list[Beam]:
    return asyncio.run(beam_search(table_step, [0], **{"width": 2, "max_tokens": 2, "eos_ids": {EOS}, **kw}))


def test_the_algorithm_on_a_worked_table() -> None:
    """Greedy takes 1 then 3 (-2.0); beam search keeps 2 (-1.0) alive and finds 2, 5 (-1.1)."""
    best = search()
    assert [b.generated for b in best] == [[2, 5], [1, 3]]
    assert [round(b.cum_logprob, 6) for b in best] == [-1.1, -2.0] and not any(b.ended for b in best)
    # A third step: 1, 3, EOS ends (cum -2.1, scored over 3 tokens: the prompt's and two, not the EOS).
    three = search(max_tokens=3)
    ended = [b for b in three if b.ended]
    assert ended and ended[0].generated == [1, 3] and ended[0].tokens[-1] == EOS
    assert ended[0].score(1.0) == pytest.approx(-2.1 / 3)
    assert all(not b.ended for b in search(max_tokens=3, ignore_eos=True))
    # length_penalty 0 ranks by the sum alone; a width of 1 is greedy.
    assert [b.generated for b in search(width=1)] == [[1, 3]]
    assert search(length_penalty=0.0)[0].generated == [2, 5]


@pytest.fixture(scope="module")
def adapter(adapter_factory: Callable[..., Path]) -> Path:
    return adapter_factory("beams_a", r=8, alpha=32, targets=ATTN, seed=77)


@pytest.fixture(scope="module")
def server(adapter: Path) -> Iterator[str]:
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", max_model_len=256, lora_modules=(("a", str(adapter)),)))
    with running(build_app(engine)) as url:
        yield url


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=300)


def peft_beams(hf_base: torch.nn.Module, adapter: Path, prompt: list[int], width: int, max_tokens: int,
               eos: set[int]) -> list[Beam]:
    """The same search, each step's log-probabilities from PEFT's model (fp32, the whole sequence recomputed)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_base, adapter)

    async def step(beams: list[list[int]]) -> list[Sequence[tuple[int, float]]]:
        tops = []
        for tokens in beams:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            top = torch.topk(torch.log_softmax(logits, -1), 2 * width)
            tops.append(list(zip(top.indices.tolist(), top.values.tolist())))
        return tops

    try:
        return asyncio.run(beam_search(step, prompt, width, max_tokens, eos))
    finally:
        model.unload()


def test_served_beams_equal_the_search_over_peft(server: str, adapter: Path, hf_base: torch.nn.Module,
                                                 default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                  tokenize=False)
    prompt = tok.encode(text, add_special_tokens=False)
    eos = {tok.eos_token_id}
    r = post(server, "/v1/completions", {"model": "a", "prompt": prompt, "n": 3, "use_beam_search": True,
                                         "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = peft_beams(hf_base, adapter, prompt, 3, 6, eos)
    assert [c["text"] for c in body["choices"]] == [tok.decode(b.generated) for b in ref]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop" if b.ended else "length" for b in ref]
    assert len({c["text"] for c in body["choices"]}) == 3 and body["system_fingerprint"] == "a@1"
    assert body["usage"]["completion_tokens"] == sum(len(b.tokens) - len(prompt) for b in ref)


def test_beams_share_the_batch_and_change_no_answer(server: str) -> None:
    """A beam search of the adapter and the chats of others, at once: each answer is the one it gets alone."""
    beam = {"model": "a", "messages": [{"role": "user", "content": "Name a fruit."}], "n": 4,
            "use_beam_search": True, "max_tokens": 8}
    chats = [{"model": m, "messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0}
             for m, q in ((BASE, "Name a fruit."), ("a", "What is 2 + 2?"), ("a", "Name a fruit."))]
    jobs = [beam, *chats]
    alone = [post(server, "/v1/chat/completions", b).json()["choices"] for b in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = [r.json()["choices"] for r in pool.map(lambda b: post(server, "/v1/chat/completions", b), jobs)]
    assert together == alone and len(alone[0]) == 4


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": True}, "stream"), ({"top_p": 0.5}, "top_p"), ({"logprobs": True}, "logprobs"),
    ({"stop": ["x"]}, "stop"), ({"n": 11}, "n"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"seed": 1}, "seed"),
])
def test_what_beam_search_cannot_honour_is_refused_by_name(server: str, extra: dict[str, Any], param: str) -> None:
    r = post(server, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                              "use_beam_search": True, "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_generate_refuses_beam_search(server: str) -> None:
    r = post(server, "/generate", {"prompt": "Hi", "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search", r.text
