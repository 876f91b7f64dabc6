"""SlotTable: adapter -> device slot assignment with reference counts, LRU reuse, pinning and invalidation."""

from __future__ import annotations

import pytest

from loraplex.adapters.slots import SlotTable


def test_first_acquire_needs_load_and_repeat_acquire_shares_the_slot() -> None:
    """A new adapter gets a free slot and must be loaded; acquiring it again returns the same slot, no load."""
    t = SlotTable(2)
    g1 = t.acquire("a")
    assert g1 is not None and g1.needs_load and g1.slot in (0, 1)
    g2 = t.acquire("a")
    assert g2 is not None and g2.slot == g1.slot and not g2.needs_load
    assert t.refs == {"a": 2} and t.resident() == ["a"]


def test_free_slots_are_used_before_evicting_an_idle_adapter() -> None:
    """An idle resident adapter stays cached while free slots remain; re-acquiring it needs no load."""
    t = SlotTable(2)
    ga = t.acquire("a")
    t.release("a")
    gb = t.acquire("b")
    assert gb is not None and gb.slot != ga.slot and t.evictions == 0
    again = t.acquire("a")
    assert again is not None and again.slot == ga.slot and not again.needs_load


def test_least_recently_used_idle_adapter_is_evicted_first() -> None:
    """With all slots occupied, the idle adapter released longest ago gives up its slot."""
    t = SlotTable(3)
    slots = {k: t.acquire(k).slot for k in "abc"}  # type: ignore[union-attr]
    for k in ("b", "a", "c"):  # release order = recency order: b is the LRU
        t.release(k)
    g = t.acquire("d")
    assert g is not None and g.needs_load and g.slot == slots["b"] and t.evictions == 1
    assert sorted(t.resident()) == ["a", "c", "d"]
    t.release("d")
    g = t.acquire("e")  # next LRU is a
    assert g is not None and g.slot == slots["a"] and "a" not in t.slot_of


def test_reacquiring_an_idle_adapter_refreshes_its_recency() -> None:
    """Using an idle adapter again moves it to most-recently-used, so the other idle one is evicted instead."""
    t = SlotTable(2)
    sa = t.acquire("a").slot  # type: ignore[union-attr]
    sb = t.acquire("b").slot  # type: ignore[union-attr]
    t.release("a")
    t.release("b")  # LRU order: a, b
    assert t.acquire("a").slot == sa  # type: ignore[union-attr]
    t.release("a")  # LRU order: b, a
    g = t.acquire("c")
    assert g is not None and g.slot == sb and sorted(t.resident()) == ["a", "c"]


def test_referenced_slot_is_never_reassigned() -> None:
    """While any reference remains, an adapter keeps its slot; acquire of another adapter returns None."""
    t = SlotTable(1)
    slot = t.acquire("a").slot  # type: ignore[union-attr]
    t.acquire("a")
    t.release("a")  # one reference left
    assert not t.can_acquire("b") and t.acquire("b") is None
    assert t.slot_of == {"a": slot} and t.refs == {"a": 1} and t.evictions == 0
    assert t.can_acquire("a")  # sharing the resident adapter is always possible
    t.release("a")
    assert t.refs == {} and t.can_acquire("b")
    g = t.acquire("b")
    assert g is not None and g.slot == slot and g.needs_load and t.evictions == 1


def test_acquire_returns_none_when_every_slot_is_busy_and_changes_nothing() -> None:
    """All slots referenced: acquire of a new adapter fails without side effects."""
    t = SlotTable(2)
    t.acquire("a")
    t.acquire("b")
    before = (dict(t.slot_of), dict(t.refs), t.evictions)
    assert t.acquire("c") is None and not t.can_acquire("c")
    assert (dict(t.slot_of), dict(t.refs), t.evictions) == before


def test_pinned_adapter_is_never_evicted() -> None:
    """A pinned idle adapter keeps its slot even when it is the LRU; with only pinned idle slots, acquire fails."""
    pins: set[str] = set()
    t = SlotTable(2, pins.__contains__)
    sa = t.acquire("a").slot  # type: ignore[union-attr]
    sb = t.acquire("b").slot  # type: ignore[union-attr]
    pins.add("a")
    t.release("a")  # a is LRU but pinned
    t.release("b")
    g = t.acquire("c")
    assert g is not None and g.slot == sb and t.slot_of["a"] == sa
    assert not t.can_acquire("d") and t.acquire("d") is None  # a pinned idle, c referenced
    t.release("c")
    g = t.acquire("d")
    assert g is not None and g.slot == sb and t.slot_of["a"] == sa
    assert t.acquire("a") is not None and not t.acquire("a").needs_load  # type: ignore[union-attr]


def test_invalidate_frees_the_slot_and_forces_a_reload() -> None:
    """invalidate() forgets an idle adapter: its slot becomes free and the next acquire must load it again."""
    t = SlotTable(1)
    slot = t.acquire("a").slot  # type: ignore[union-attr]
    t.release("a")
    t.invalidate("a")
    assert t.resident() == [] and "a" not in t.slot_of
    g = t.acquire("a")
    assert g is not None and g.slot == slot and g.needs_load and t.evictions == 0


def test_invalidate_refuses_a_referenced_adapter_and_ignores_unknown_ones() -> None:
    """invalidate() of an adapter in use raises and leaves it resident; of a non-resident adapter it is a no-op."""
    t = SlotTable(2)
    t.acquire("a")
    with pytest.raises(RuntimeError, match="'a'"):
        t.invalidate("a")
    assert t.resident() == ["a"] and t.refs == {"a": 1}
    t.invalidate("never-loaded")
    assert t.resident() == ["a"] and t.can_acquire("b")
    g = t.acquire("b")
    assert g is not None and g.slot != t.slot_of["a"]


def test_refcounts_balance_over_many_operations() -> None:
    """A long acquire/release sequence never hands a referenced adapter's slot to another, and slots stay unique."""
    import random

    rng = random.Random(0)
    t = SlotTable(3)
    held: list[str] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            t.release(held.pop(rng.randrange(len(held))))
        else:
            key = rng.choice("abcdef")
            before = {k: t.slot_of[k] for k in set(held)}
            g = t.acquire(key)
            if g is None:
                assert len(set(held)) == 3 and key not in t.slot_of
                continue
            held.append(key)
            assert all(t.slot_of[k] == s for k, s in before.items())  # referenced slots untouched
        assert t.refs == {k: held.count(k) for k in set(held)}
        assert len(set(t.slot_of.values())) == len(t.slot_of) <= 3
