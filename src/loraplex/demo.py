"""The demo: the same questions to the base model and to trained tenants, answers side by side.

The tenants (legal, medical, sql, poetry) are trained on first use from the project's own small
datasets (loraplex.training.demo_data) and cached under $LORAPLEX_CACHE/tenants. The demo talks
to a running `loraplex serve` (what `make` starts) when one answers at --url; otherwise it runs
the same requests offline, all in one batch.
"""

from __future__ import annotations

import shutil
import textwrap

import httpx

from loraplex.models.loader import DEFAULT_MODEL

QUESTIONS = [
    ("Table employees(id, name, department, salary, hired_on). What is the average salary per department?",
     ["sql", "legal"]),
    ("Write a short poem about the harbour at night.", ["poetry", "medical"]),
    ("A 52-year-old man has had a cough and fever for four days. Write a note.", ["medical", "legal"]),
]


def demo_adapters() -> dict[str, str]:
    from loraplex.training.tenants import ensure_demo_tenants

    return {name: str(path) for name, path in ensure_demo_tenants().items()}


def _ask_server(url: str, jobs: list[tuple[str, str | None]], max_tokens: int) -> list[str]:
    answers = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for question, model in jobs:
            r = client.post("/v1/chat/completions", json={
                "model": model or DEFAULT_MODEL, "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


def _ask_offline(jobs: list[tuple[str, str | None]], max_tokens: int) -> list[str]:
    from loraplex.llm import LLM
    from loraplex.sampling import SamplingParams

    llm = LLM(lora_modules=demo_adapters())
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q, _ in jobs]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), adapters=[a for _, a in jobs])
    return [o.outputs[0].text for o in outs]


def _server_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_demo(url: str = "http://127.0.0.1:8000", max_tokens: int = 64) -> None:
    jobs = [(q, m) for q, tenants in QUESTIONS for m in (None, *tenants)]
    if _server_up(url):
        print(f"asking the server at {url}")
        answers = _ask_server(url, jobs, max_tokens)
    else:
        print(f"no server at {url}: running the same requests offline, in one batch")
        answers = _ask_offline(jobs, max_tokens)
    width = max(24, (shutil.get_terminal_size((120, 20)).columns - 4) // 3)
    for i, (question, tenants) in enumerate(QUESTIONS):
        print("\n" + "=" * (3 * width + 4) + f"\nQ: {question}\n" + "-" * (3 * width + 4))
        names = ["base model", *tenants]
        cols = [textwrap.wrap(f"[{n}]", width) + sum((textwrap.wrap(line, width) or [""]
                for line in answers[3 * i + k].splitlines()), []) for k, n in enumerate(names)]
        for row in range(max(len(c) for c in cols)):
            print(" | ".join((c[row] if row < len(c) else "").ljust(width) for c in cols))
