"""A registry file shared by several engines (the replicas of a cluster): every change merges the others' first,
so none is lost; an engine that only serves picks the others' changes up with `refresh`; the adapter manager
applies them (promotion, pin, unregistration) as if they had been made locally. No model, no torch work."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.manager import AdapterManager
from loraplex.adapters.registry import AdapterRegistry


def _peft_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return path


def test_changes_from_two_engines_are_merged_not_overwritten(tmp_path: Path) -> None:
    state = tmp_path / "registry.json"
    a, b = AdapterRegistry(state_file=state), AdapterRegistry(state_file=state)
    p1, p2 = _peft_dir(tmp_path / "p1"), _peft_dir(tmp_path / "p2")
    a.register(AdapterSpec("legal"), p1)
    b.register(AdapterSpec("poetry"), p2)  # b had not read a's change: it merges it before writing
    assert set(json.loads(state.read_text())["adapters"]) == {"legal", "poetry"}
    assert b.register(AdapterSpec("legal"), p2, promote=False) == AdapterKey("legal", "2")  # knows version 1
    a.refresh()
    assert a.take_changes() == {"poetry", "legal"} and a.take_changes() == set()
    assert a.resolve(AdapterSpec("legal", "2"))[1] == p2 and a.current("legal") == "1"
    b.promote("legal", "2")
    b.unregister("poetry")
    a.refresh()
    assert a.current("legal") == "2" and "poetry" not in a.entries and a.take_changes() == {"legal", "poetry"}
    assert a.version == b.version > 0


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """Eight registries on one file registering at once from threads: every name ends up in the file."""
    state = tmp_path / "registry.json"
    path = _peft_dir(tmp_path / "p")
    regs = [AdapterRegistry(state_file=state) for _ in range(8)]
    threads = [threading.Thread(target=lambda r=r, i=i: [r.register(AdapterSpec(f"n{i}-{j}"), path) for j in range(5)])
               for i, r in enumerate(regs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(state.read_text())["adapters"]) == 40


def test_the_manager_applies_another_engines_promotion_pin_and_unregistration(tmp_path: Path) -> None:
    state = tmp_path / "registry.json"
    p1, p2 = _peft_dir(tmp_path / "p1"), _peft_dir(tmp_path / "p2")
    other = AdapterRegistry(state_file=state)
    other.register(AdapterSpec("legal"), p1)
    mgr = AdapterManager(AdapterRegistry(state_file=state), num_slots=4, host_capacity=4,
                         loader=lambda name, path: path.name)  # type: ignore[arg-type,return-value]
    v1 = mgr.resolve(AdapterSpec("legal"))
    mgr.acquire(v1)  # a request running on version 1
    mgr.wait()
    mgr.poll()
    other.register(AdapterSpec("legal"), p2)  # version 2, promoted elsewhere
    other.set_pinned("legal", True)
    assert mgr.sync() == ["legal"]
    v2 = mgr.resolve(AdapterSpec("legal"))
    assert v2 == AdapterKey("legal", "2") and mgr.is_pinned(v2)  # the pin follows, and loads in the background
    assert v1 in mgr.host  # still used by the running request
    mgr.release(v1)
    assert v1 not in mgr.host  # superseded: freed once its last request finished
    other.unregister("legal")
    assert mgr.sync() == ["legal"] and "legal" not in mgr.registry.entries and not mgr.is_pinned(v2)
    assert mgr.sync() == []
