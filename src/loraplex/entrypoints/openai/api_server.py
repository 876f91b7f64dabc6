"""`python -m loraplex.entrypoints.openai.api_server [flags]` is `loraplex serve [flags]`, as
`python -m vllm.entrypoints.openai.api_server` is `vllm serve`: scripts written for vLLM's module form run unchanged
with the package renamed."""

from __future__ import annotations

import sys

from loraplex.cli import main as cli_main  # first: it sets the OpenMP spin count before torch is imported


def main(argv: list[str] | None = None) -> None:
    cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
