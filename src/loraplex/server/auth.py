"""API keys: each key names the adapters it may use; the admin scope guards load, unload, promote and pin.

Keys file (JSON), checked strictly (an unknown field, or a value of the wrong type, names itself and stops the
server from starting):
    {"keys": {"sk-legal": {"adapters": ["legal"]},
              "sk-ops":   {"adapters": ["*"], "admin": true},
              "sk-prom":  {"adapters": [], "base": false, "metrics": true},
              "sk-demo":  {"adapters": ["poetry"], "base": false, "cache_group": "demo"},
              "sk-big":   {"adapters": ["sql"], "weight": 3},
              "sk-trial": {"adapters": ["sql"], "requests_per_minute": 60, "tokens_per_minute": 20000,
                           "max_in_flight": 4}}}
`base` (default true) allows the base model; `metrics` (default false) allows /metrics, which names every
tenant (admin keys may read it too). `cache_group`: keys with the same group share prefix-cache entries; by
default each key has its own, so no key learns from its cache hits (or their timing) what another key sent.
Each key is a tenant of the engine's fair share (engine/fair_share.py) with its `weight` (default 1): while tenants
are backlogged, their shares of the running batch are proportional to their weights. Its caps (server/quotas.py):
`max_in_flight` (default: the engine's batch plus half the queue), `requests_per_minute`, `tokens_per_minute`;
over one is a 429 with OpenAI's headers.
Without a keys file the server is open: one operator, loopback only unless --insecure-no-api-keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from loraplex.engine.request import Share
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError
from loraplex.server.quotas import Limits


@dataclass(frozen=True, slots=True)
class KeyScope:
    adapters: frozenset[str]
    base: bool = True
    admin: bool = False
    metrics: bool = False  # may read /metrics (every tenant's series); admin keys may too
    cache_group: str | None = None  # prefix-cache namespace (None: shared with every None, the open server's)
    owner: str | None = None  # the key's own id (from its digest): its rows on /v1/stats; None on an open server
    weight: float = 1.0  # its share of the batch against other keys' (engine/fair_share.py)
    limits: Limits = Limits()  # its caps at the door (server/quotas.py)

    def share(self, priority: int = 0) -> Share:
        """The key as the engine's tenant (on an open server none: RequestJob.share names the adapter instead)."""
        return Share(self.owner, self.weight, priority)

    def may_use(self, adapter: str | None) -> bool:
        if adapter is None:
            return self.base
        return "*" in self.adapters or adapter in self.adapters


OPEN = KeyScope(frozenset({"*"}), base=True, admin=True, metrics=True)


class _KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    adapters: list[StrictStr] = Field(default_factory=list, max_length=100_000)
    base: StrictBool = True
    admin: StrictBool = False
    metrics: StrictBool = False
    cache_group: StrictStr | None = Field(default=None, min_length=1, max_length=256)
    weight: StrictFloat | StrictInt = Field(default=1, gt=0, le=1000)
    max_in_flight: StrictInt | None = Field(default=None, ge=1)
    requests_per_minute: StrictInt | None = Field(default=None, ge=1)
    tokens_per_minute: StrictInt | None = Field(default=None, ge=1)


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    keys: dict[StrictStr, _KeySpec] = Field(min_length=1)


def load_keys(path: Path) -> dict[str, KeyScope]:
    """The keys file, validated: a field of the wrong type (`"admin": "false"`, `"adapters": "legal"`) or an
    unknown one is an InvalidRequestError naming the key's position and the field."""
    try:
        data = _KeysFile.model_validate_json(path.read_bytes())
    except OSError as e:
        raise InvalidRequestError(f"API keys file {path} cannot be read: {e}") from e
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise InvalidRequestError(f"API keys file {path} is invalid: {where}; expected "
                                  '{"keys": {KEY: {"adapters": [...], "base": true, "admin": false, "metrics": '
                                  'false, "cache_group": null, "weight": 1, "max_in_flight": null, '
                                  '"requests_per_minute": null, "tokens_per_minute": null}}}') from e
    keys = {}
    for key, spec in data.keys.items():
        if not key.strip():
            raise InvalidRequestError(f"API keys file {path}: a key is empty")
        keys[key] = KeyScope(frozenset(spec.adapters), spec.base, spec.admin, spec.metrics, spec.cache_group,
                             weight=float(spec.weight),
                             limits=Limits(spec.max_in_flight, spec.requests_per_minute, spec.tokens_per_minute))
    return keys


def server_keys(api_keys: Path | None, admin_keys: tuple[str, ...] = ()) -> dict[str, KeyScope] | None:
    """The keys a server accepts: its keys file's and its full-access keys (vLLM's --api-key: every adapter, the
    admin and metrics scopes); None without either (an open server). A key given both ways is refused: its scope
    would be ambiguous."""
    keys = load_keys(api_keys) if api_keys is not None else {}
    for key in admin_keys:
        if key in keys:
            raise InvalidRequestError(f"a key given by --api-key is also in the API keys file {api_keys}: give each "
                                      "key once")
        keys[key] = OPEN
    return keys or None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """A key's own id (its default prefix-cache namespace and its /v1/stats rows): derived from the key, which it
    never reveals."""
    return "key-" + _digest(key).hex()[:24]


def cache_salt(scope: KeyScope, requested: str | None) -> str | None:
    """The prefix-cache salt a request runs under: its key's cache group, then the salt it asked for (vLLM's
    `cache_salt`), so a request's salt can narrow its sharing but never reach into another group's blocks."""
    if scope.cache_group is None:
        return requested
    return scope.cache_group + "\x00" + (requested or "")


class Authenticator:
    def __init__(self, keys: dict[str, KeyScope] | None, open_limits: Limits = Limits()) -> None:
        """`open_limits`: each tenant's caps on a server without keys (its tenants are the adapters)."""
        self.open = replace(OPEN, limits=open_limits)
        self.keys: dict[str, KeyScope] | None = None
        self._by_digest: dict[bytes, KeyScope] = {}
        if keys is not None:
            self.replace_keys(keys)

    def replace_keys(self, keys: dict[str, KeyScope]) -> None:
        """The keys from now on (a reloaded keys file): requests already admitted keep the scope they had. A key's
        id, and so its prefix-cache namespace, stats rows and caps' books (server/quotas.py), stay its own."""
        # Each key gets its own id; a key without a cache_group gets its own namespace.
        scopes = {k: replace(s, owner=key_id(k), cache_group=key_id(k) if s.cache_group is None else s.cache_group)
                  for k, s in keys.items()}
        # Looked up by digest: one dict probe per request, whatever the number of keys, and no comparison of the
        # secret itself whose timing depends on how much of it matched. Both maps swapped whole, never edited.
        self.keys, self._by_digest = scopes, {_digest(k): s for k, s in scopes.items()}

    def scope(self, request: Request) -> KeyScope:
        """The caller's scope; 401 without a valid bearer key when keys are configured."""
        return self.scope_of(request.headers.get("authorization", ""))

    def scope_of(self, header: str) -> KeyScope:
        """The scope an Authorization header grants (OPEN without keys); 401 for a missing or unknown key."""
        if self.keys is None:
            return self.open
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        found = self._by_digest.get(_digest(token.strip()))
        if found is not None:
            return found
        raise APIError(401, "invalid API key", "invalid_api_key")

    @staticmethod
    def check_model(scope: KeyScope, adapter: str | None, model: str) -> None:
        if not scope.may_use(adapter):
            raise APIError(403, f"this API key may not use model {model!r}", "permission_denied", "model")

    @staticmethod
    def check_admin(scope: KeyScope) -> None:
        if not scope.admin:
            raise APIError(403, "this endpoint needs an API key with the admin scope", "permission_denied")

    @staticmethod
    def check_metrics(scope: KeyScope) -> None:
        if not (scope.admin or scope.metrics):
            raise APIError(403, "/metrics needs an API key with the admin or the metrics scope", "permission_denied")
