"""A cluster replica's host tier follows Ray Serve's multiplexing: its admission policy caches what the replica
claims, so when Ray's LRU of adapter ids drops one, the replica drops that adapter from host memory, except versions
a request uses or a pin holds. No model, no Ray cluster (the replica module only imports ray.serve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.registry import AdapterRegistry
from loraplex.cluster.replica import Claim


def _manager(tmp_path: Path, names: list[str], claimed: set[str]) -> AdapterManager:
    """`claimed`: the replica's claims by name, which the host admission policy caches (mutated by the test)."""
    mgr = AdapterManager(AdapterRegistry(), num_slots=4, host_capacity=8,
                         loader=lambda name, path: AdapterWeights(name, path, rank=4),
                         admits=lambda key: key.name in claimed)
    for name in names:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        mgr.register(AdapterSpec(name), path)
    return mgr


def test_an_unclaim_drops_unused_versions_and_keeps_used_and_pinned_ones(tmp_path: Path) -> None:
    claimed = {"legal", "poetry", "sql"}
    mgr = _manager(tmp_path, ["legal", "poetry", "sql"], claimed)
    legal, poetry, sql = (AdapterKey(n, "1") for n in ("legal", "poetry", "sql"))
    mgr.acquire(poetry)  # a request running
    mgr.pin("sql")
    claimed.clear()  # Ray's LRU dropped all three
    assert mgr.readmit() == 1
    assert legal not in mgr.host and poetry in mgr.host and sql in mgr.host
    assert mgr.readmit() == 0  # nothing else to drop
    mgr.release(poetry)  # its last request: it leaves with it
    assert poetry not in mgr.host and mgr.readmit() == 0
    claimed.add("legal")
    mgr.acquire(legal)  # the next request loads it again
    mgr.wait()
    mgr.poll()
    mgr.release(legal)
    assert legal in mgr.host and mgr.stats({}, {}).evictions["host"] == 1


def test_a_claim_evicts_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    claim = Claim("legal", lambda model: calls.append(model) or 1)
    claim.__del__()  # Ray's LRU dropped the id
    claim.__del__()  # the garbage collector, later
    assert calls == ["legal"]

    def broken(model: str) -> int:
        raise RuntimeError("engine stopped")

    Claim("legal", broken).__del__()  # logged; Ray's next load goes on
    assert "dropping unclaimed adapter legal" in caplog.text


def test_a_transient_copy_is_dropped_after_its_request_unless_claimed_or_pinned(tmp_path: Path) -> None:
    """A replica serving an adapter it does not claim: the copy evicts nothing and leaves with its last request
    (its idle device slot too); a pin arriving meanwhile keeps it, as a claim (then a prefetch) does."""
    claimed: set[str] = set()
    mgr = _manager(tmp_path, ["legal", "poetry", "sql"], claimed)
    legal, poetry, sql = (AdapterKey(n, "1") for n in ("legal", "poetry", "sql"))
    assert not mgr.host.keys()  # registration validated them; unclaimed, none stays
    mgr.acquire(legal)
    mgr.wait()
    mgr.poll()
    assert mgr.host.uncached() == [legal] and mgr.take_slot(legal) is not None
    assert mgr.in_memory(legal) and legal in mgr.resident() and not mgr.in_memory(poetry)
    mgr.release_slot(legal)
    mgr.release(legal)
    assert legal not in mgr.host and legal not in mgr.slots.slot_of and legal not in mgr.table.records
    assert not mgr.in_memory(legal) and legal not in mgr.resident()  # what a replica's IsResident reads
    mgr.acquire(poetry)
    mgr.wait()
    mgr.poll()
    mgr.pin("poetry")
    mgr.release(poetry)
    assert poetry in mgr.host and not mgr.host.uncached()
    mgr.acquire(sql)
    claimed.add("sql")  # Ray claimed it while the copy loads: it stays
    mgr.prefetch(AdapterSpec("sql"))
    mgr.wait()
    mgr.poll()
    mgr.release(sql)
    assert sql in mgr.host and not mgr.host.uncached() and not mgr.users
