"""The commands the docs show are the commands the code has: every `loraplex <command> --flag ...` in README.md,
docs/**/*.md and the Makefile's recipes names a real subcommand and real options of it (checked against the
argparse parser `loraplex.cli.build_parser` builds), every complete command in a code block parses, every bare
`--flag` code span in prose is an option of some subcommand (or of the benchmark script allowed below), and every
`make <target>` shown is a target of the Makefile. No model, no server: a few hundred milliseconds.

What counts as a command: a token `loraplex` or `<path>/loraplex` (`.venv/bin/loraplex`, `$(BIN)/loraplex`), or
`python -m loraplex.cli` (`python -m loraplex` has no `__main__`: shown, it fails the test), in a fenced code block (not a Python one) or an inline code span.
Continuation lines (`\\`) are joined, `# comments` dropped, and a command ends at `|`, `&&`, `;`, `>` or `&`.
Optional parts in brackets (`[--base MODEL]`) are checked like the rest; `...` stands for more of the same and
is skipped, and placeholders (MODEL, N) are plain values."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from loraplex.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MAKEFILE = ROOT / "Makefile"

# Bare `--flag` spans in prose that belong to a benchmark script rather than to `loraplex`: the flag -> the
# script that must define it.
FOREIGN_FLAGS = {"--chaos": "benchmarks/soak.py", "--skip": "benchmarks/prefix_cache.py"}
# vLLM's serve flags, each with what loraplex does with it: generated from cli_vllm.py and checked against it
# (tests/test_cli_vllm.py), so its spans name vLLM's flags, most of which loraplex refuses by name.
VLLM_FLAG_TABLE = "docs/vllm_flags.md"

SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
NON_SHELL = {"python", "py", "json", "jsonl", "yaml", "toml", "html", "javascript", "js"}


@dataclass(frozen=True)
class Snippet:
    """One logical line of a doc: where it is, its text, and whether it came from a fenced block."""

    where: str
    text: str
    fenced: bool


@dataclass(frozen=True)
class Command:
    snippet: Snippet
    subcommand: str | None  # None: `loraplex` alone (or only global flags)
    args: tuple[str, ...]


def snippets(text: str, name: str) -> list[Snippet]:
    """Logical lines of the shell code blocks (continuations joined) and the inline code spans outside blocks."""
    out: list[Snippet] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            # Inline spans: `...` pairs on this line (double-backtick spans are rare in these docs; skip them).
            for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", lines[i]):
                out.append(Snippet(f"{name}:{i + 1}", span, fenced=False))
            i += 1
            continue
        lang = m.group(2).lower()
        j = i + 1
        block: list[tuple[int, str]] = []
        while j < len(lines) and not FENCE.match(lines[j]):
            block.append((j + 1, lines[j]))
            j += 1
        i = j + 1  # past the closing fence
        if lang in NON_SHELL:
            continue
        k = 0
        while k < len(block):
            start, line = block[k]
            while line.rstrip().endswith("\\") and k + 1 < len(block):
                k += 1
                line = line.rstrip()[:-1] + " " + block[k][1]
            out.append(Snippet(f"{name}:{start}", line, fenced=True))
            k += 1
    return out


def tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: split on spaces, cut at a comment
        words = text.split()
        return words[: next((n for n, w in enumerate(words) if w.startswith("#")), len(words))]


API_SERVER = "loraplex.entrypoints.openai.api_server"  # `python -m` it: the same as `loraplex serve`


def _module(word: str) -> str:
    """A module name as prose writes it: without the quoting backticks and the punctuation after it."""
    return word.strip("`").rstrip("`:,.;)")


def _is_loraplex(words: list[str], n: int) -> int:
    """How many tokens at `n` name the loraplex program (0: none)."""
    w = words[n].strip("`")
    if w == "loraplex" or w.endswith("/loraplex"):
        return 1
    if re.fullmatch(r"(.*/)?python[\d.]*", w) and words[n + 1 : n + 2] == ["-m"] and n + 2 < len(words):
        module = _module(words[n + 2])
        if module in ("loraplex.cli", API_SERVER):
            return 3
        if module.split(".")[0] == "loraplex":  # `python -m loraplex` (no __main__) or another module: not the CLI
            raise AssertionError(f"`python -m {module}` does not run the CLI; show `python -m loraplex.cli`")
    return 0


def commands(snippet: Snippet) -> list[Command]:
    """The loraplex invocations in one snippet (a line may hold several, joined by `&&` or `|`)."""
    words = tokens(snippet.text)
    found: list[Command] = []
    n = 0
    while n < len(words):
        width = _is_loraplex(words, n)
        if not width:
            n += 1
            continue
        args: list[str] = ["serve"] if _module(words[n + width - 1]) == API_SERVER else []  # vLLM's module form of serve
        n += width
        while n < len(words) and words[n] not in SEPARATORS:
            args.append(words[n].strip("`"))
            n += 1
        globals_ = [a for a in args if a in ("-v", "--verbose")]
        rest = args[len(globals_):] if args[: len(globals_)] == globals_ else args
        sub = rest[0] if rest and not rest[0].startswith("-") else None
        found.append(Command(snippet, sub, tuple(rest[1:] if sub else rest)))
    return found


def normalized(args: tuple[str, ...]) -> list[str]:
    """Brackets of optional parts removed, `...` dropped (kept as the value right after a flag: `--prompt "..."`)."""
    out: list[str] = []
    for a in args:
        a = a.strip("[]")
        if a in ("...", "…") and not (out and out[-1].startswith("--")):
            continue
        if a:
            out.append(a)
    return out


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", a)]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def doc_snippets() -> list[Snippet]:
    out = []
    for path in DOC_FILES:
        out += snippets(path.read_text(), str(path.relative_to(ROOT)))
    return out


def makefile_snippets() -> list[Snippet]:
    """The Makefile's recipe lines, continuations joined, as fenced snippets."""
    out, lines = [], MAKEFILE.read_text().splitlines()
    k = 0
    while k < len(lines):
        start, line = k + 1, lines[k]
        while line.rstrip().endswith("\\") and k + 1 < len(lines):
            k += 1
            line = line.rstrip()[:-1] + " " + lines[k]
        if line.startswith("\t"):
            out.append(Snippet(f"Makefile:{start}", line.strip(), fenced=True))
        k += 1
    return out


def problems(snips: list[Snippet], parser: argparse.ArgumentParser) -> list[str]:
    """Every documented command that names a missing subcommand or option, or (in a code block) does not parse."""
    subs = subparsers(parser)
    top = options(parser)
    found: list[str] = []
    for snip in snips:
        for cmd in commands(snip):
            shown = f"`{snip.text.strip()}`"
            if cmd.subcommand is None:
                bad = [f for f in flags(normalized(cmd.args)) if f not in top]
                if bad:
                    found.append(f"{snip.where}: {shown}: `loraplex` has no option {', '.join(bad)}")
                continue
            if cmd.subcommand not in subs:
                found.append(f"{snip.where}: {shown}: no subcommand `{cmd.subcommand}` (have: {', '.join(subs)})")
                continue
            sub = subs[cmd.subcommand]
            args = normalized(cmd.args)
            bad = [f for f in flags(args) if f not in options(sub)]
            if bad:
                found.append(f"{snip.where}: {shown}: `loraplex {cmd.subcommand}` has no option {', '.join(bad)}")
                continue
            if snip.fenced and not any("$" in a for a in args):  # a complete command: it must parse
                error = parse_error(sub, args)
                if error:
                    found.append(f"{snip.where}: {shown}: `loraplex {cmd.subcommand}` refuses it: {error}")
    return found


class _Refused(Exception):
    pass


def parse_error(sub: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's message for `args`, or None if they parse (nothing printed, nothing exits)."""
    def error(message: str) -> NoReturn:
        raise _Refused(message)

    parsers = [sub, *subparsers_of(sub)]
    saved = [p.error for p in parsers]
    for p in parsers:
        p.error = error  # type: ignore[method-assign]
    try:
        sub.parse_args(args)
    except _Refused as e:
        return str(e)
    finally:
        for p, original in zip(parsers, saved):
            p.error = original  # type: ignore[method-assign]
    return None


def subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]


def make_targets() -> set[str]:
    targets: set[str] = set()
    for line in MAKEFILE.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if m:
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
    return targets


def make_problems(snips: list[Snippet], targets: set[str]) -> list[str]:
    found = []
    for snip in snips:
        words = tokens(snip.text)
        for n, w in enumerate(words):
            if w.strip("`") != "make" or n + 1 >= len(words):
                continue
            nxt = words[n + 1].strip("`.,;:)")
            if not nxt or nxt.startswith("-") or "=" in nxt or nxt in SEPARATORS:
                continue
            if nxt not in targets:
                found.append(f"{snip.where}: `{snip.text.strip()}`: the Makefile has no target `{nxt}`")
    return found


def vllm_flags_served() -> set[str]:
    """vLLM's flags that `loraplex serve` accepts or maps (cli_vllm.py): real flags of serve, though not its own."""
    from loraplex.cli_vllm import ACCEPTED, CATALOG, MAPPED, ONLY, canonical

    return {n for flag in CATALOG.values() if canonical(flag) in {*ACCEPTED, *ONLY, *MAPPED} for n in flag.names}


def prose_flag_problems(snips: list[Snippet], parser: argparse.ArgumentParser) -> list[str]:
    """Inline spans that start with a flag (`--max-loras`, `--quantize nf4`): an option of some subcommand."""
    known = options(parser).union(*(options(p) for p in subparsers(parser).values()), vllm_flags_served())
    found = []
    for snip in snips:
        if snip.fenced or snip.where.startswith(VLLM_FLAG_TABLE + ":"):
            continue
        words = tokens(snip.text)
        if not words or not words[0].startswith("--"):
            continue
        for f in flags([w.strip("[]") for w in words]):
            if f in known:
                continue
            script = FOREIGN_FLAGS.get(f)
            if script and f'"{f}"' in (ROOT / script).read_text():
                continue
            found.append(f"{snip.where}: `{snip.text}`: no `loraplex` command has {f}")
    return found


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_the_docs_show_every_subcommand(parser: argparse.ArgumentParser) -> None:
    """The extractor finds the documented commands at all (else the other tests would pass on nothing)."""
    shown = {c.subcommand for s in doc_snippets() for c in commands(s)}
    assert set(subparsers(parser)) - {"demo"} <= shown, f"not shown in any doc: {set(subparsers(parser)) - shown}"
    fenced = [c for s in doc_snippets() if s.fenced for c in commands(s)]
    assert len(fenced) >= 10


def test_documented_commands_are_real(parser: argparse.ArgumentParser) -> None:
    found = problems(doc_snippets() + makefile_snippets(), parser)
    assert not found, "documented commands the CLI does not have:\n" + "\n".join(found)


def test_flags_named_in_prose_are_real(parser: argparse.ArgumentParser) -> None:
    found = prose_flag_problems(doc_snippets(), parser)
    assert not found, "flags the CLI does not have:\n" + "\n".join(found)


def test_make_targets_exist() -> None:
    targets = make_targets()
    assert {"all", "test", "serve", "demo", "soak", "bench"} <= targets
    found = make_problems(doc_snippets(), targets)
    assert not found, "\n".join(found)


def test_the_check_catches_a_wrong_command(parser: argparse.ArgumentParser) -> None:
    """The checks fail on a bogus flag, a missing subcommand, a bad value and a missing target, wherever shown."""
    doc = """
Run `loraplex serve --max-loras 4 --no-such-flag`, or

```bash
.venv/bin/loraplex train --data d.jsonl --output out \\
    [--rank 8 --bogus-option 3] ...
python -m loraplex.cli servee --port 1
.venv/bin/loraplex serve --dtype float8     # not a choice
make tset
```

```python
from loraplex import LLM   # Python blocks are not commands
```
"""
    snips = snippets(doc, "x.md")
    found = problems(snips, parser)
    assert len(found) == 4, found
    assert "--no-such-flag" in found[0] and found[0].startswith("x.md:2:")
    assert found[1].startswith("x.md:5:") and found[1].endswith("`loraplex train` has no option --bogus-option")
    assert "no subcommand `servee`" in found[2]
    assert "refuses it" in found[3] and "float8" in found[3]
    assert make_problems(snips, make_targets()) == ["x.md:9: `make tset`: the Makefile has no target `tset`"]
    assert prose_flag_problems(snippets("Set `--max-loraz 4` or `--max-loras 4`.", "y.md"), parser) == [
        "y.md:1: `--max-loraz 4`: no `loraplex` command has --max-loraz"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text, found, fenced = path.read_text(), set(), False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*)", line)):
            found.add(slug(m.group(1)))
    return found


def test_relative_links_resolve() -> None:
    """Every relative link in README.md and docs/ names a file that exists, and a heading of it after `#`."""
    found = []
    for path in DOC_FILES:
        fenced = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if FENCE.match(line):
                fenced = not fenced
            if fenced:
                continue
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                where = f"{path.relative_to(ROOT)}:{n}: ({target})"
                if not dest.exists():
                    found.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    found.append(f"{where}: no heading #{anchor}")
    assert not found, "\n".join(found)
