"""Totals over several engines' state (a cluster's replicas): snapshots and per-model counts summed field by
field, for /metrics and /v1/stats. A type that knows how to sum itself (a histogram's buckets) has a `summed`
classmethod, so this module needs no engine or adapter type. No torch."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from loraplex.engine.outputs import EngineSnapshot


def merge(snapshots: list[EngineSnapshot]) -> EngineSnapshot | None:
    """The cluster's totals: counters, gauges and histogram buckets summed over the replicas."""
    return summed(snapshots) if snapshots else None


def summed(values: list[Any]) -> Any:
    """Field by field over values of one type (at least one): numbers summed, flags or-ed, dicts key by key,
    a type with a `summed` classmethod (histograms) by it; anything else (strings, lists) is the first value's."""
    first = values[0]
    if isinstance(first, bool):
        return any(values)
    if isinstance(first, (int, float)):
        return sum(values)
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: summed([v[k] for v in values if k in v]) for k in keys}
    own = getattr(type(first), "summed", None)
    if own is not None:
        return own(values)
    if is_dataclass(first):
        return replace(first, **{f.name: summed([getattr(v, f.name) for v in values]) for f in fields(first)})
    return first
