"""ResidencyTable: one record per adapter version holds both tiers' state; HostCache and SlotTable are policies over
it and keep none of their own. No model."""

from __future__ import annotations

import random

from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.residency import ResidencyTable
from loraplex.adapters.slots import SlotTable


def tiers(num_slots: int, capacity: int, held: set[str]) -> tuple[ResidencyTable[str, int], HostCache[str, int],
                                                                   SlotTable[str]]:
    table: ResidencyTable[str, int] = ResidencyTable(num_slots)
    return table, HostCache(capacity, held.__contains__, table=table), SlotTable(num_slots, table=table)


def test_one_record_holds_the_weights_and_the_slot() -> None:
    """An adapter in both tiers is one record; it goes when neither tier holds it and nothing refers to it."""
    table, host, slots = tiers(2, 2, set())
    host.put("a", 7)
    grant = slots.acquire("a")
    assert grant is not None
    rec = table.records["a"]
    assert (rec.weights, rec.slot, rec.slot_refs) == (7, grant.slot, 1)
    assert table.occupants[grant.slot] == "a" and host.keys() == ["a"] and slots.slot_of == {"a": grant.slot}
    host.drop("a")
    assert "a" in table.records and "a" not in host  # its slot still holds it
    slots.release("a")
    slots.invalidate("a")
    assert table.records == {} and table.occupants == [None, None]


def test_a_record_that_users_or_a_pin_hold_stays_when_both_tiers_let_it_go() -> None:
    """The tiers' evictions never drop what the owner counts: a record with users, a pin or a load stays."""
    table, host, _ = tiers(1, 1, set())
    host.put("a", 1)
    table["a"].users = 1
    host.drop("a")
    assert table.records["a"].users == 1  # the request still needs it: loaded again later
    table["a"].users = 0
    table.tidy("a")
    assert table.records == {}


def test_random_operations_keep_the_table_consistent() -> None:
    """Any sequence of the tiers' operations leaves every slot's occupant and its record agreeing, the references
    counted, the capacity kept where it can be, and no record that nothing refers to."""
    rng = random.Random(0)
    held: set[str] = set()
    table, host, slots = tiers(3, 4, held)
    refs: dict[str, int] = {}
    for _ in range(3000):
        key = rng.choice("abcdefgh")
        op = rng.randrange(6)
        if op == 0:
            host.put(key, ord(key))
        elif op == 1:
            host.get(key)
        elif op == 2 and key not in held:
            host.drop(key)
        elif op == 3 and slots.acquire(key) is not None:
            refs[key] = refs.get(key, 0) + 1
        elif op == 4 and refs.get(key):
            slots.release(key)
            refs[key] -= 1
        elif op == 5:
            (held.add if key not in held else held.discard)(key)
        for s, k in enumerate(table.occupants):
            assert k is None or table.records[k].slot == s
        assert all(rec.slot is None or table.occupants[rec.slot] == k for k, rec in table.records.items())
        assert slots.refs == {k: n for k, n in refs.items() if n}
        assert all(not rec.vacant for rec in table.records.values())
        assert all(table.records[k].weights == ord(k) for k in host.keys())
        if op == 0:  # over capacity only when every other entry is held
            assert len(host) <= 4 or all(k in held for k in host.keys() if k != key)
