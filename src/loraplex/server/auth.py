"""API keys: each key names the adapters it may use; the admin scope guards load, unload, promote and pin.

Keys file (JSON):
    {"keys": {"sk-legal": {"adapters": ["legal"]},
              "sk-ops":   {"adapters": ["*"], "admin": true},
              "sk-demo":  {"adapters": ["poetry"], "base": false}}}
`base` (default true) allows the base model. Without a keys file the server is open.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError


@dataclass(frozen=True, slots=True)
class KeyScope:
    adapters: frozenset[str]
    base: bool = True
    admin: bool = False

    def may_use(self, adapter: str | None) -> bool:
        if adapter is None:
            return self.base
        return "*" in self.adapters or adapter in self.adapters


OPEN = KeyScope(frozenset({"*"}), base=True, admin=True)


def load_keys(path: Path) -> dict[str, KeyScope]:
    try:
        data = json.loads(path.read_text())
        keys = {}
        for key, spec in data["keys"].items():
            keys[str(key)] = KeyScope(frozenset(spec.get("adapters", [])), bool(spec.get("base", True)),
                                      bool(spec.get("admin", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidRequestError(f"API keys file {path} is invalid: {e}; expected {{\"keys\": {{KEY: {{\"adapters\": [...]}}}}}}") from e
    if not keys:
        raise InvalidRequestError(f"API keys file {path} defines no keys")
    return keys


class Authenticator:
    def __init__(self, keys: dict[str, KeyScope] | None) -> None:
        self.keys = keys

    def scope(self, request: Request) -> KeyScope:
        """The caller's scope; 401 without a valid bearer key when keys are configured."""
        if self.keys is None:
            return OPEN
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "AuthenticationError")
        for key, scope in self.keys.items():
            if secrets.compare_digest(key.encode(), token.strip().encode()):
                return scope
        raise APIError(401, "invalid API key", "AuthenticationError")

    @staticmethod
    def check_model(scope: KeyScope, adapter: str | None, model: str) -> None:
        if not scope.may_use(adapter):
            raise APIError(403, f"this API key may not use model {model!r}", "PermissionDeniedError", "model")

    @staticmethod
    def check_admin(scope: KeyScope) -> None:
        if not scope.admin:
            raise APIError(403, "this endpoint needs an API key with the admin scope", "PermissionDeniedError")
