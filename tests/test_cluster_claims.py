"""A cluster replica's host tier follows Ray Serve's multiplexing: when Ray's LRU of adapter ids drops one, the
replica drops that adapter from host memory, except versions a request uses or a pin holds. No model, no Ray
cluster (the replica module only imports ray.serve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.peft_format import AdapterWeights
from loraplex.adapters.registry import AdapterRegistry
from loraplex.cluster.replica import Claim


def _manager(tmp_path: Path, names: list[str]) -> AdapterManager:
    mgr = AdapterManager(AdapterRegistry(), num_slots=4, host_capacity=8,
                         loader=lambda name, path: AdapterWeights(name, path, rank=4))
    for name in names:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        mgr.register(AdapterSpec(name), path)
    return mgr


def test_evict_drops_unused_versions_and_keeps_used_and_pinned_ones(tmp_path: Path) -> None:
    mgr = _manager(tmp_path, ["legal", "poetry", "sql"])
    legal, poetry, sql = (AdapterKey(n, "1") for n in ("legal", "poetry", "sql"))
    mgr.acquire(poetry)  # a request running
    mgr.pin("sql")
    assert [mgr.evict(AdapterSpec(n)) for n in ("legal", "poetry", "sql")] == [1, 0, 0]
    assert legal not in mgr.host and poetry in mgr.host and sql in mgr.host
    assert mgr.evict(AdapterSpec("poetry", "7")) == 0  # another version named: nothing of version 1 goes
    mgr.release(poetry)
    assert mgr.evict(AdapterSpec("poetry", "1")) == 1 and poetry not in mgr.host
    mgr.acquire(legal)  # the next request loads it again
    mgr.wait()
    mgr.poll()
    assert legal in mgr.host and mgr.stats({}, {}).evictions["host"] == 2


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


def test_a_transient_copy_is_dropped_after_its_request_unless_kept_or_pinned(tmp_path: Path) -> None:
    """A replica serving an adapter it does not claim: the copy evicts nothing and leaves with its last request
    (its idle device slot too); a pin arriving meanwhile keeps it, as a claim (prefetch) does."""
    mgr = _manager(tmp_path, ["legal", "poetry", "sql"])
    legal, poetry, sql = (AdapterKey(n, "1") for n in ("legal", "poetry", "sql"))
    for key in (legal, poetry, sql):
        mgr.evict(AdapterSpec(key.name))  # registration cached them: start cold
    mgr.acquire(legal, keep=False)
    mgr.wait()
    mgr.poll()
    assert legal in mgr.host.transient and mgr.take_slot(legal) is not None
    mgr.release_slot(legal)
    mgr.release(legal)
    assert legal not in mgr.host and legal not in mgr.slots.slot_of and not mgr.host.transient
    mgr.acquire(poetry, keep=False)
    mgr.wait()
    mgr.poll()
    mgr.pin("poetry")
    mgr.release(poetry)
    assert poetry in mgr.host and not mgr.host.transient
    mgr.acquire(sql, keep=False)
    mgr.prefetch(AdapterSpec("sql"))  # Ray claimed it while the copy loads: it stays
    mgr.wait()
    mgr.poll()
    mgr.release(sql)
    assert sql in mgr.host and not mgr.host.transient and not mgr.users
