"""vLLM's serve flags on loraplex's command line: what loraplex does with each is vllm_flag_rules.py's; this file
takes them out of argv and writes docs/vllm_flags.md (`flag_doc()`; tests/test_cli_vllm.py checks that it is current).

`split_vllm_flags` runs before argparse: it takes vLLM's flags and their values out of the command line, so that a
value (`-tp 1`) is never read as the positional model, and leaves every other token to argparse.
"""

from __future__ import annotations

from loraplex.cli_forms import CommandLineError
from loraplex.vllm_flag_rules import CATALOG, VllmFlag, what_happens
from loraplex.vllm_serve_flags import VLLM_VERSION


def split_vllm_flags(argv: list[str], ours: set[str]) -> tuple[list[str], list[tuple[VllmFlag, list[str]]]]:
    """argv without the vLLM flags that are not `ours`, and those flags with their values (vLLM's nargs)."""
    rest: list[str] = []
    taken: list[tuple[VllmFlag, list[str]]] = []
    n = 0
    while n < len(argv):
        word = argv[n]
        name, eq, inline = word.partition("=")
        flag = CATALOG.get(name) if word.startswith("-") and name not in ours else None
        if flag is None:
            rest.append(word)
            n += 1
            continue
        n += 1
        values = [inline] if eq else []
        if not eq and flag.nargs is None:
            if n >= len(argv):
                raise CommandLineError(f"{name} needs a value")
            values, n = [argv[n]], n + 1
        elif not eq and flag.nargs in ("+", "*", "?"):
            while n < len(argv) and not argv[n].startswith("-"):
                values.append(argv[n])
                n += 1
        taken.append((flag, values))
    return rest, taken


def flag_table(ours: set[str]) -> str:
    """The Markdown table of every vLLM serve flag (one row per flag, its aliases beside it)."""
    seen: set[int] = set()
    rows = [f"| vLLM {VLLM_VERSION} flag | group | loraplex |", "|---|---|---|"]
    for flag in CATALOG.values():
        if id(flag) in seen:
            continue
        seen.add(id(flag))
        names = ", ".join(f"`{n}`" for n in flag.names)
        rows.append(f"| {names} | {flag.group} | {what_happens(flag, ours)} |")
    return "\n".join(rows) + "\n"


DOC_HEAD = """# vLLM's serve flags in loraplex

Every flag of `vllm serve` {version} and what `loraplex serve` does with it: loraplex's own flag of that name,
accepted (what it asks for is already so here; the reason is logged once at start), mapped to the loraplex setting
that means the same, or refused by name with the reason. None is ignored silently. A `--config FILE.yaml` setting
is treated as the flag of its name. Written by `.venv/bin/python src/loraplex/cli_vllm.py` from that file's
rules (tests/test_cli_vllm.py checks that it is current); the flags themselves are read from vLLM's parser by
`benchmarks/peers/vllm_serve_flags.py`.

"""


def serve_flags() -> set[str]:
    """`loraplex serve`'s own flags (and the top level's)."""
    from loraplex.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices["serve"]._option_string_actions) | set(parser._option_string_actions)


def flag_doc() -> str:
    return DOC_HEAD.format(version=VLLM_VERSION) + flag_table(serve_flags())


if __name__ == "__main__":
    from pathlib import Path

    out = Path(__file__).resolve().parents[2] / "docs" / "vllm_flags.md"
    out.write_text(flag_doc())
    print(f"wrote {out}")
