"""What a start-up module (`--lora-modules name=path`) does to a registry that already knows the name. No torch.

Every restart, and in a cluster every replica start, passes the same flags again, while admins may since have
promoted, pinned, loaded or unloaded versions. The flags must never undo those decisions, so a module is compared
by its weights' digest (adapters/peft_format.py: sha256 of the config and weight files) with what the name has:

- the same weights as a version the name has: no new version; that version becomes current again only if the
  current one was itself chosen by start-up flags (or found under --adapter-dir), never over an admin's promotion;
- other weights: a new version, current under the same condition (otherwise it waits for a promotion);
- a name an admin unloaded: it stays unloaded while the module's weights are those it had when unloaded (the
  unload came after the flag and wins); an operator who changes the weights has made a new decision, and the
  new weights are registered (and the tombstone cleared), as a load through the API would.

The registry applies a Decision under its lock and file transaction (AdapterRegistry.register_startup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.adapters.registry_file import AdapterEntry, Tombstone

ADMIN, STARTUP = "admin", "startup"  # who registered a version or made it current (else: the adapter root)


@dataclass(frozen=True, slots=True)
class Decision:
    keep_unloaded: bool = False  # an admin unloaded the name and the weights have not changed since
    version: str | None = None  # an existing version with these weights (None: register a new version)
    promote: bool = False  # make the version (existing or new) current
    current: str | None = None  # the name's current version before the decision
    current_by_admin: bool = False
    unloaded_at: str | None = None  # when an admin unloaded the name (kept unloaded, or cleared by new weights)

    def message(self, name: str, new_version: str | None = None) -> str:
        """The start-up log line: which rule applied, and what an operator can do about it."""
        if self.keep_unloaded:
            return (f"{name}: unloaded by an admin at {self.unloaded_at}; the --lora-modules weights are the ones "
                    "it had, so it stays unloaded (load it with POST /v1/load_lora_adapter, or change its weights)")
        admin_kept = (f"; {name}@{self.current} stays current (promoted by an admin: promote the new one with "
                      "POST /v1/promote_lora_adapter)")
        if self.version is not None:
            if self.version == self.current:
                return f"{name}: same weights as {name}@{self.version}, kept"
            if self.promote:
                return f"{name}: same weights as {name}@{self.version}, current again (was {name}@{self.current})"
            return f"{name}: same weights as {name}@{self.version}, kept" + admin_kept
        if self.unloaded_at is not None:
            return (f"{name}: new weights registered as {name}@{new_version}, current (an admin unloaded it at "
                    f"{self.unloaded_at} with other weights)")
        if self.current is None:
            return f"{name}: registered as {name}@{new_version}"
        line = f"{name}: new weights registered as {name}@{new_version}"
        return line + (", current" if self.promote else admin_kept)


def decide(entry: AdapterEntry | None, stone: Tombstone | None, digest: str) -> Decision:
    """The rule (module docstring) for a module with weights `digest`, given the name's entry (None: the registry
    has no version of it) and its tombstone (None: no admin unloaded it)."""
    if entry is None:
        if stone is not None:
            return Decision(keep_unloaded=digest in stone.digests, promote=True, unloaded_at=stone.when())
        return Decision(promote=True)
    by_admin = entry.current_by == ADMIN
    same = sorted((v for v, d in entry.digests.items() if d == digest and v in entry.versions), key=_numeric_first)
    version = entry.current if entry.current in same else (same[-1] if same else None)
    return Decision(version=version, promote=not by_admin and version != entry.current, current=entry.current,
                    current_by_admin=by_admin)


def _numeric_first(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def owned_by_flags(entry: AdapterEntry) -> bool:
    """Whether only start-up flags ever decided about the name: no admin loaded, promoted or pinned a version of it,
    and none was found under --adapter-dir. Such a name leaves the registry when the flags stop naming it."""
    return not entry.pinned and entry.current_by != ADMIN and all(entry.origins.get(v) == STARTUP
                                                                    for v in entry.versions)


def why_kept(entry: AdapterEntry) -> str:
    """Why a name the start-up flags no longer give stays registered (the complement of owned_by_flags)."""
    if entry.pinned:
        return "an admin pinned it"
    if entry.current_by == ADMIN:
        return f"an admin promoted {entry.name}@{entry.current}"
    if any(entry.origins.get(v) == ADMIN for v in entry.versions):
        return "an admin loaded a version of it"
    return "it has versions under --adapter-dir"
