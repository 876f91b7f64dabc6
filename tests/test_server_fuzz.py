"""Fuzz the server's own OpenAPI document with schemathesis against a real uvicorn server: no 5xx, ever."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis import GenerationMode

from loraplex import EngineConfig
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.server.app import build_app
from server_util import running


@pytest.fixture(scope="module")
def fuzz_schema(adapter_factory) -> Iterator[schemathesis.BaseSchema]:  # type: ignore[no-untyped-def]
    # A short context keeps every generation bounded whatever max_tokens the fuzzer picks.
    mods = (("t0", str(adapter_factory("fuzz0", r=4, seed=500))),)
    engine = AsyncLLMEngine(EngineConfig(max_model_len=48, lora_modules=mods, max_num_seqs=16))
    with running(build_app(engine, max_queue=64)) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


_NEUTRAL = ("tools", "suffix", "best_of", "functions", "function_call", "audio", "modalities", "prediction",
            "web_search_options")


def _steer(case: schemathesis.Case, model: str | None) -> schemathesis.Case:
    """Point part of the cases at a real model with the unsupported extras removed, so that the fuzzer reaches
    sampling, scheduling and streaming rather than stopping at 'unknown model'."""
    if model is not None and isinstance(case.body, dict) and "model" in case.body:
        case.body = {k: v for k, v in case.body.items() if k not in _NEUTRAL} | {"model": model}
    if model is not None and isinstance(case.body, dict) and "tenant_id" in case.body:
        case.body["tenant_id"] = None if model == BASE else model
    return case


BASE = "SmolLM2-135M-Instruct"

# One well-formed body per generation endpoint, run as an explicit example beside the drawn ones. What
# Hypothesis draws depends on more than the seed (it mixes in string constants from every loaded project
# module), so whether a drawn body gets past validation is luck; these make sure generation always runs.
WELL_FORMED = {
    "/v1/chat/completions": {"model": "t0", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
    "/v1/completions": {"model": BASE, "prompt": "Once upon", "max_tokens": 3},
}


@pytest.mark.slow
def test_no_server_errors(fuzz_schema: schemathesis.BaseSchema) -> None:
    """Whatever the body, path or parameters of any operation — well-formed or not — the answer is never a 5xx."""
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: Counter[tuple[str, int]] = Counter()

    for op in operations:
        for mode in GenerationMode:
            cases = st.builds(_steer, op.as_strategy(generation_mode=mode), st.sampled_from([None, BASE, "t0"]))

            @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None, phases=[Phase.explicit, Phase.generate])
            @given(case=cases)
            def check(case: schemathesis.Case) -> None:
                response = case.call(timeout=120)
                statuses[(case.path, response.status_code)] += 1
                assert response.status_code < 500, (
                    f"{case.method} {case.path} {case.body!r} -> {response.status_code}: {response.text[:500]}")

            if mode is GenerationMode.POSITIVE and op.path in WELL_FORMED:
                check = example(case=op.Case(body=WELL_FORMED[op.path], media_type="application/json"))(check)
            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without inputs
    print(sorted(statuses.items()))
    # Generations ran (the explicit examples at least), and bad bodies got 4xx.
    assert statuses[("/v1/chat/completions", 200)] > 0 and statuses[("/v1/completions", 200)] > 0
    assert statuses[("/v1/chat/completions", 400)] > 0
