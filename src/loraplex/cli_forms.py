"""The forms vLLM users write serve's flags in, read into loraplex's: `--lora-modules` as NAME=PATH or JSON,
`--config FILE.yaml` (every flag, vLLM's format), `--api-key` or its environment variables, `--chat-template` as a
file or as the template itself. No torch: `--help` and a refused command line stay fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.vllm_flag_rules import VllmFlag

log = logging.getLogger(__name__)

API_KEY_ENV = ("LORAPLEX_API_KEY", "VLLM_API_KEY")  # read where --api-key is not given, in this order
_MODULE_FIELDS = {"name", "path", "base_model_name"}


class CommandLineError(Exception):
    """A flag's value is wrong: the CLI prints it as one line and exits with status 2."""


@dataclass(frozen=True, slots=True)
class LoraModule:
    name: str
    path: str
    base_model_name: str | None = None  # vLLM's lineage field: the base the adapter was trained on


def parse_lora_modules(items: list[str]) -> list[LoraModule]:
    """`--lora-modules` values: NAME=PATH, or vLLM's JSON object {"name", "path", "base_model_name"}."""
    modules = []
    for item in items:
        if item.lstrip().startswith("{"):
            modules.append(_json_module(item))
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CommandLineError(f"--lora-modules expects NAME=PATH or a JSON object with name and path, got {item!r}")
        modules.append(LoraModule(name, path))
    return modules


def _json_module(item: str) -> LoraModule:
    try:
        spec = json.loads(item)
    except json.JSONDecodeError as e:
        raise CommandLineError(f"--lora-modules: {item!r} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise CommandLineError(f"--lora-modules: {item!r} is JSON but not an object")
    unknown = sorted(set(spec) - _MODULE_FIELDS)
    if unknown:
        raise CommandLineError(f"--lora-modules: unknown field(s) {', '.join(unknown)} in {item!r}; "
                               f"an adapter has {', '.join(sorted(_MODULE_FIELDS))}")
    for field in ("name", "path"):
        if not isinstance(spec.get(field), str) or not spec[field]:
            raise CommandLineError(f"--lora-modules: {item!r} needs a non-empty string {field!r}")
    base = spec.get("base_model_name")
    if base is not None and not isinstance(base, str):
        raise CommandLineError(f"--lora-modules: base_model_name must be a string in {item!r}")
    return LoraModule(spec["name"], spec["path"], base)


def check_lineage(modules: list[LoraModule], served: set[str]) -> None:
    """A module whose base_model_name is none of the names this server answers to is logged: names are not
    identities (a hub id and a local path name one model), so the loader's shape check is what refuses a
    mismatched adapter."""
    for m in modules:
        if m.base_model_name is not None and m.base_model_name not in served:
            log.warning("--lora-modules %s names base_model_name %r, not one of this server's names (%s); it is "
                        "served on this server's base model if its shapes fit", m.name, m.base_model_name,
                        ", ".join(sorted(served)))


def api_keys_from(flag: list[str] | None) -> tuple[str, ...]:
    """`--api-key` values, else those of LORAPLEX_API_KEY and VLLM_API_KEY (each may hold one key)."""
    if flag:
        return tuple(dict.fromkeys(flag))
    return tuple(dict.fromkeys(os.environ[v] for v in API_KEY_ENV if os.environ.get(v)))


RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def any_adapter_path() -> bool:
    """vLLM's switch for runtime LoRA loads, honoured: set true, they may read any path the server can read."""
    value = os.environ.get(RUNTIME_LORA_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise CommandLineError(f"{RUNTIME_LORA_ENV}={os.environ[RUNTIME_LORA_ENV]!r}: set it to True or False")


def chat_template_text(value: str | None) -> str | None:
    """`--chat-template`: a file's path (read), else the template itself, as vLLM takes it."""
    if value is None:
        return None
    path = Path(value).expanduser()
    looks_like_a_path = "{" not in value and "\n" not in value
    if looks_like_a_path:
        try:
            return path.read_text()
        except OSError as e:
            raise CommandLineError(f"--chat-template {value!r}: cannot read it ({e.strerror}); give a file or the "
                                   "template text itself") from None
    return value


def apply_config_file(parser: argparse.ArgumentParser, path: Path) -> list[tuple[VllmFlag, list[str]]]:
    """Make `path`'s settings (YAML, vLLM's format: a flag's name without its dashes, and its value) `parser`'s
    defaults, so that the command line's own flags win over the file, as in vLLM. Returns the settings that are
    vLLM's flags rather than loraplex's, with their values, for cli_vllm to accept, map or refuse."""
    import yaml

    from loraplex.cli_vllm import split_vllm_flags
    from loraplex.vllm_flag_rules import CATALOG

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CommandLineError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CommandLineError(f"--config {path} is not valid YAML: {e}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise CommandLineError(f"--config {path} must map flag names to values, e.g. 'port: 8000'")
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag in ("--config", "--help", "--version"):
            raise CommandLineError(f"--config {path}: {key!r} cannot be set from a config file")
        action = parser._option_string_actions.get(flag)  # argparse keeps no public map from a flag to its action
        if action is None and flag not in CATALOG:
            raise CommandLineError(f"--config {path}: unknown setting {key!r} (neither loraplex nor vLLM has {flag})")
        argv += _setting_as_argv(path, str(key), flag, value, action, CATALOG)
    ours, vllm = split_vllm_flags(argv, set(parser._option_string_actions))
    try:
        given = parser.parse_args(ours)
    except SystemExit:
        raise CommandLineError(f"--config {path}: a value above is refused by its flag") from None
    parser.set_defaults(**{dest: v for dest, v in vars(given).items() if v != parser.get_default(dest)})
    return vllm


def _setting_as_argv(path: Path, key: str, flag: str, value: Any, action: argparse.Action | None,
                     vllm_flags: Mapping[str, object]) -> list[str]:
    """One setting as command-line words; `action` is loraplex's flag (None: a flag of `vllm_flags`, vLLM's)."""
    if value is None:
        return []
    off = "--no-" + flag[2:]
    if action is None and isinstance(value, bool):  # a vLLM switch; turned off, its --no- form where it has one
        return [flag] if value else [off] if off in vllm_flags else []
    if isinstance(action, argparse.BooleanOptionalAction) or (action is not None and action.nargs == 0):
        if not isinstance(value, bool):
            raise CommandLineError(f"--config {path}: {key} takes true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else off]
        return [flag] if value else []  # store_true
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action is not None and action.nargs in (None, "?"):
        raise CommandLineError(f"--config {path}: {key} takes one value, got a list")
    return [flag, *(json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v)
                    for v in values)]
