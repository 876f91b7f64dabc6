"""What names an adapter: a spec a client sends ("legal" or "legal@2"), parsed and validated once at the boundary,
and the key of a registered version ("legal@2") that requests run on. No torch."""

from __future__ import annotations

import re
from typing import NamedTuple, overload

from loraplex.errors import InvalidAdapterNameError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str, what: str = "adapter name") -> str:
    """Names are single path components: no separators, no '..', not absolute, no control characters."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidAdapterNameError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, without '..' or path separators"
        )
    return name


class AdapterSpec(NamedTuple):
    """What a request asks for: an adapter by name, at a given version or (None) at its current one."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, spec: str) -> AdapterSpec:
        """'name' -> (name, None); 'name@version' -> (name, version). Both parts validated."""
        name, sep, version = spec.partition("@")
        validate_name(name)
        if sep:
            return cls(name, validate_name(version, "adapter version"))
        return cls(name)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


class AdapterKey(NamedTuple):
    """One registered version of an adapter: what a request runs on, what the tiers and slots hold."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


# What a request runs on, as its entry point resolved it once: an adapter spec ("legal", "legal@2"), the key of a
# version a sibling request was admitted on, or None for the base model. Below the entry points, never text.
AdapterTarget = AdapterSpec | AdapterKey | None


@overload
def parse_target(model: str | AdapterSpec | AdapterKey) -> AdapterSpec | AdapterKey: ...


@overload
def parse_target(model: str | AdapterTarget) -> AdapterTarget: ...


def parse_target(model: str | AdapterTarget) -> AdapterTarget:
    """A Python caller's adapter as text ("legal", "legal@2") parsed into a spec, once, where it enters (LLMEngine's
    add_request and prompt_logits, AsyncLLMEngine.generate, Ray's multiplexed model id); a spec, key or None passes
    as it is. The HTTP server parses the `model` field itself, after the key's check (ServerState.resolve_model)."""
    return AdapterSpec.parse(model) if isinstance(model, str) else model
