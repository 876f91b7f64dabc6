"""AsyncLLMEngine: concurrent streams across adapters, streaming deltas, abort on early exit, isolated errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ALL, ATTN
from loraplex import EngineConfig, SamplingParams
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.errors import AdapterNotFoundError, PromptTooLongError


@pytest.fixture(scope="module")
def engine(adapter_factory: Callable[..., Path]) -> AsyncLLMEngine:
    mods = (("a", str(adapter_factory("async_a", r=8, targets=ATTN, seed=11))),
            ("b", str(adapter_factory("async_b", r=4, targets=ALL, seed=12))))
    eng = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=mods, max_model_len=512))
    yield eng
    eng.shutdown()


def _prompt(engine: AsyncLLMEngine, text: str) -> list[int]:
    tok = engine.engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False), add_special_tokens=False)


async def _collect(engine: AsyncLLMEngine, prompt: list[int], adapter: str | None, params: SamplingParams) -> tuple[str, list[int], str]:
    deltas = []
    final = None
    async for out in engine.generate(prompt, params, adapter):
        deltas.append(out.outputs[0].delta_text)
        final = out
    assert final is not None and final.finished
    return "".join(deltas), final.outputs[0].token_ids, final.outputs[0].text


@pytest.mark.slow
def test_concurrent_streams_match_sequential(engine: AsyncLLMEngine) -> None:
    """12 concurrent streams over 2 adapters + base equal the same requests run one at a time; deltas add up to the text."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    jobs = [(_prompt(engine, f"Count to {i + 3}."), [None, "a", "b"][i % 3]) for i in range(12)]

    async def run_all() -> list[tuple[str, list[int], str]]:
        return await asyncio.gather(*(_collect(engine, p, a, params) for p, a in jobs))

    async def run_one_by_one() -> list[tuple[str, list[int], str]]:
        return [await _collect(engine, p, a, params) for p, a in jobs]

    together = asyncio.run(run_all())
    alone = asyncio.run(run_one_by_one())
    assert [t[1] for t in together] == [t[1] for t in alone]
    for streamed, _, text in together:
        assert streamed == text


def test_abort_on_early_exit_frees_capacity(engine: AsyncLLMEngine) -> None:
    """A consumer that stops reading aborts its request: its KV blocks and adapter slot reference are freed."""
    free_before = engine.engine.blocks.num_free

    async def read_two() -> None:
        gen = engine.generate(_prompt(engine, "Tell me a long story."), SamplingParams(max_tokens=200, ignore_eos=True), "a")
        n = 0
        async for _ in gen:
            n += 1
            if n == 2:
                break
        await gen.aclose()
        for _ in range(100):  # the abort runs on the engine thread between steps
            if engine.num_unfinished == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(read_two())
    assert engine.num_unfinished == 0
    assert engine.engine.blocks.num_free == free_before
    assert not engine.engine.adapters.slots.refs


def test_errors_reach_only_their_request(engine: AsyncLLMEngine) -> None:
    """An unknown adapter and an over-long prompt fail their own coroutine; a concurrent good request completes."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def scenario() -> list[object]:
        return await asyncio.gather(
            _collect(engine, _prompt(engine, "Hi"), "missing", params),
            _collect(engine, [5] * 600, None, params),
            _collect(engine, _prompt(engine, "Hi"), "b", params),
            return_exceptions=True,
        )

    missing, too_long, good = asyncio.run(scenario())
    assert isinstance(missing, AdapterNotFoundError)
    assert isinstance(too_long, PromptTooLongError)
    assert isinstance(good, tuple) and len(good[1]) == 8
