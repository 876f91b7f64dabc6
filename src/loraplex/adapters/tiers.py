"""TierView: which adapter versions are where right now — each device slot's occupant, the host cache in LRU
order, the disk loads in flight — for the dashboard. Built by AdapterManager.tiers() under its lock. No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResidentAdapter:
    name: str
    version: str
    rank: int | None  # the largest LoRA rank of its layers; None when its weights are no longer in host memory
    refcount: int  # requests holding it in this tier (device: scheduled requests; host: queued or running)
    pinned: bool


@dataclass(frozen=True, slots=True)
class TierView:
    slots: list[ResidentAdapter | None]  # index = device slot; None = empty
    host: list[ResidentAdapter]  # least recently used first
    host_capacity: int
    loading: list[tuple[str, str]]  # (name, version) being read from disk
