"""Structured outputs through llguidance: JSON schemas, any JSON object, regexes, choices and grammars, on the base
model and on adapters in one batch with unconstrained requests (which keep their solo tokens); schemas with
errors are refused naming the problem; the JSON has no runaway whitespace. Over HTTP: the openai client's
`chat.completions.parse` with a Pydantic model, and 100 schema-constrained requests that all validate."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import ALL, ATTN
from loraplex import EngineConfig, LLM, SamplingParams
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.errors import InvalidRequestError
from loraplex.sampling import StructuredOutput
from loraplex.server.app import build_app
from server_util import running

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "minItems": 1, "maxItems": 3},
                                          "done": {"type": "boolean"}},
         "required": ["items", "done"], "additionalProperties": False}
SCHEMAS = [PERSON, ITEMS, {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 1000}},
                           "required": ["answer"], "additionalProperties": False}]


@pytest.fixture(scope="module")
def adapters(adapter_factory: Callable[..., Path]) -> dict[str, str]:
    return {"a": str(adapter_factory("so-a", r=8, alpha=16, targets=ALL, seed=31)),
            "b": str(adapter_factory("so-b", r=4, alpha=8, targets=ATTN, seed=32))}


@pytest.fixture(scope="module")
def llm(adapters: dict[str, str]) -> LLM:
    return LLM(dtype="float32", lora_modules=adapters, max_model_len=512, kv_cache_memory=64 << 20)


def ask(llm: LLM, q: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": q}])


def constrained(kind: str, value: str = "", max_tokens: int = 60) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, structured=StructuredOutput(kind, value))


@pytest.mark.slow
def test_every_kind_holds_in_a_mixed_batch(llm: LLM) -> None:
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    jobs = [(ask(llm, "Describe a person as JSON."), constrained("json_schema", json.dumps(PERSON)), "a"),
            (ask(llm, "Tell me a story."), plain, "a"),
            (ask(llm, "Give me a JSON object."), constrained("json_object"), None),
            (ask(llm, "What is your phone number?"), constrained("regex", r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"), "b"),
            (ask(llm, "Is the sky blue?"), constrained("choice", json.dumps(["yes", "no", "maybe"])), None),
            (ask(llm, "Count to three."), plain, None),
            (ask(llm, "Add two numbers."), constrained("grammar", 'start: NUM " + " NUM " = " NUM\nNUM: /[0-9]{1,3}/'), "b")]
    alone = [llm.generate([p], s, adapters=[a])[0].outputs[0] for p, s, a in jobs]
    together = [o.outputs[0] for o in llm.generate([p for p, _, _ in jobs], [s for _, s, _ in jobs],
                                                  adapters=[a for _, _, a in jobs])]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    person, obj, phone, choice, total = (together[i].text for i in (0, 2, 3, 4, 6))
    jsonschema.validate(json.loads(person), PERSON)
    assert isinstance(json.loads(obj), dict)
    assert re.fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", phone)
    assert choice in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{1,3} \+ [0-9]{1,3} = [0-9]{1,3}", total)
    assert all(together[i].finish_reason == "stop" for i in (0, 2, 3, 4, 6))
    assert "\n" not in person and "  " not in person  # bounded whitespace: one space after , and : only


def test_bad_constraints_are_refused_naming_the_problem(llm: LLM) -> None:
    for spec, needle in ((StructuredOutput("json_schema", "{not json"), "invalid json_schema"),
                         (StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}})), "invalid json_schema"),
                         (StructuredOutput("regex", "(unclosed"), "invalid regex"),
                         (StructuredOutput("grammar", "start: undefined_rule"), "invalid grammar")):
        with pytest.raises(InvalidRequestError, match=needle):
            llm.engine.add_request(ask(llm, "hi"), SamplingParams(structured=spec))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="kind"):
        StructuredOutput("yaml")


class City(BaseModel):
    name: str = Field(max_length=30)  # bounded fields: a small model's answer ends within max_tokens
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def server(adapters: dict[str, str]) -> Iterator[str]:
    engine = AsyncLLMEngine(EngineConfig(dtype="float32", lora_modules=tuple(adapters.items()), max_model_len=512,
                                         kv_cache_memory=128 << 20))
    with running(build_app(engine)) as url:
        yield url


def test_parse_with_a_pydantic_model_on_base_and_adapter(server: str) -> None:
    import concurrent.futures

    c = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Describe the city of Paris."}]

    def parse(model: str) -> City:
        r = c.chat.completions.parse(model=model, messages=msgs, response_format=City, max_tokens=200, temperature=0)
        assert r.choices[0].message.parsed is not None, r.choices[0].message.content
        return r.choices[0].message.parsed

    def free(model: str) -> str:
        return c.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # constrained and free requests in the same batches
        futures = [pool.submit(parse, "SmolLM2-135M-Instruct"), pool.submit(parse, "a"), pool.submit(free, "b"),
                   pool.submit(free, "SmolLM2-135M-Instruct")]
        cities = [f.result() for f in futures[:2]]
        assert all(isinstance(f.result(), str) for f in futures[2:])
    assert all(isinstance(x, City) for x in cities)


@pytest.mark.slow
def test_hundred_schema_requests_over_adapters_all_validate(server: str) -> None:
    import asyncio

    async def run() -> list[tuple[dict, str]]:
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=600)

        async def one(i: int) -> tuple[dict, str]:
            schema = SCHEMAS[i % len(SCHEMAS)]
            model = ["SmolLM2-135M-Instruct", "a", "b"][i % 3]
            r = await c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Fill in the form, number {i}."}], max_tokens=100,
                temperature=0.7, seed=i,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i % 3}", "schema": schema, "strict": True}})
            return schema, r.choices[0].message.content or ""

        return await asyncio.gather(*(one(i) for i in range(100)))

    for schema, text in asyncio.run(run()):
        jsonschema.validate(json.loads(text), schema)


def test_bad_structured_requests_over_http(server: str) -> None:
    import httpx

    base = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for extra, needle in (({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
                          ({"response_format": {"type": "yaml"}}, "response_format type"),
                          ({"guided_regex": "(", "guided_choice": ["a"]}, "give one output constraint"),
                          ({"guided_json": {"type": "object", "properties": {"a": {"type": 5}}}}, "invalid json_schema"),
                          ({"structured_outputs": {"choice": []}}, "malformed")):
        r = httpx.post(server + "/v1/chat/completions", json={**base, **extra}, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (extra, r.text)
    ok = httpx.post(server + "/v1/completions", json={"model": "b", "prompt": "The answer is", "max_tokens": 10,
                                                     "structured_outputs": {"choice": ["yes", "no"]}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no")
