"""The soak's chaos loop: every few seconds an admin action on an adapter (often one in use) — a new version
(promoted or not), a promotion back to an older one, an unload and a later re-load, a pin or unpin — and now
and then a burst above the server's queue limit. It keeps the truth the checks need: which weights each
version has, and when each adapter was unloaded."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class AdminLog:
    paths: dict[str, Path] = field(default_factory=dict)  # "a3@2" -> the weights that version has
    versions: dict[str, list[str]] = field(default_factory=dict)  # adapter -> its registered versions
    unloaded: dict[str, list[list[float]]] = field(default_factory=dict)  # adapter -> [[from, to]] (to: inf if still)
    actions: dict[str, int] = field(default_factory=dict)  # action -> times done
    failures: list[str] = field(default_factory=list)  # admin calls that did not succeed as they should

    def was_unloaded(self, adapter: str, start: float, end: float) -> bool:
        return any(a <= end and start <= b for a, b in self.unloaded.get(adapter, []))


class Chaos:
    def __init__(self, url: str, admin_key: str, adapters: list[str], weights: list[float],
                 new_weights: Callable[[], Path], log: AdminLog, seed: int) -> None:
        self.url, self.adapters, self.weights = url, adapters, weights
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.new_weights = new_weights  # a fresh weights directory (distinct from every other version)
        self.log = log
        self.rng = random.Random(seed)
        self.pinned: set[str] = set()

    async def _post(self, client: httpx.AsyncClient, action: str, path: str, body: dict[str, object],
                    ok: tuple[int, ...] = (200,)) -> httpx.Response | None:
        try:
            r = await client.post(self.url + path, json=body, headers=self.headers, timeout=120)
        except httpx.HTTPError as e:
            self.log.failures.append(f"{action} {body}: {type(e).__name__}: {e}")
            return None
        self.log.actions[action] = self.log.actions.get(action, 0) + 1
        if r.status_code not in ok:
            self.log.failures.append(f"{action} {body}: {r.status_code} {r.text[:200]}")
            return None
        return r

    async def load(self, client: httpx.AsyncClient, name: str, promote: bool = True, action: str = "load") -> str | None:
        """Register fresh weights as the next version of `name`; returns the version."""
        weights = self.new_weights()
        r = await self._post(client, action, "/v1/load_lora_adapter",
                             {"lora_name": name, "lora_path": str(weights), "promote": promote})
        if r is None:
            return None
        version = str(r.json()["version"])
        self.log.paths[f"{name}@{version}"] = weights
        self.log.versions.setdefault(name, []).append(version)
        return version

    def _pick(self) -> str:
        return self.rng.choices(self.adapters, self.weights)[0]  # popular ones most: the ones in use

    async def step(self, client: httpx.AsyncClient) -> None:
        name = self._pick()
        unloaded = self.log.unloaded.get(name, [])
        if unloaded and unloaded[-1][1] == float("inf"):  # it is out: bring it back as a new version
            await self.load(client, name, action="reload")
            unloaded[-1][1] = time.perf_counter()
            return
        op = self.rng.choices(["new-version", "staged-version", "rollback", "unload", "pin"], [4, 2, 2, 1, 1])[0]
        if op == "new-version":
            await self.load(client, name, promote=True, action="load+promote")
        elif op == "staged-version":  # registered without promotion, promoted a moment later
            version = await self.load(client, name, promote=False, action="load-staged")
            if version is not None:
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                await self._post(client, "promote", "/v1/promote_lora_adapter", {"lora_name": name, "version": version})
        elif op == "rollback" and len(self.log.versions.get(name, [])) > 1:
            version = self.rng.choice(self.log.versions[name][:-1])
            await self._post(client, "promote-older", "/v1/promote_lora_adapter", {"lora_name": name, "version": version})
        elif op == "unload":
            # Marked out before the call: requests admitted just before it still finish on their version, and
            # those after it get a 404, which the checks accept only inside this window.
            self.log.unloaded.setdefault(name, []).append([time.perf_counter(), float("inf")])
            if await self._post(client, "unload", "/v1/unload_lora_adapter", {"lora_name": name}) is not None:
                self.pinned.discard(name)
                self.log.versions.pop(name, None)  # versions are not reused: a re-load gets a new number
        elif op == "pin":
            pinned = name not in self.pinned
            # Pinning more adapters than slots allow is refused with a 400 that names the limit: also fine.
            r = await self._post(client, "pin" if pinned else "unpin", "/v1/pin_lora_adapter",
                                 {"lora_name": name, "pinned": pinned}, ok=(200, 400))
            if r is not None and r.status_code == 200:
                (self.pinned.add if pinned else self.pinned.discard)(name)

    async def run(self, client: httpx.AsyncClient, stop_at: float, interval: float) -> None:
        while time.perf_counter() < stop_at:
            await self.step(client)
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * interval)
