"""AdapterRegistry and HostCache without a model: names, versions, the adapter root, persistence, LRU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import fill_disk
from loraplex.adapters.host_cache import HostCache
from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.registry import AdapterRegistry
from loraplex.errors import AdapterNotFoundError, AdapterVersionExistsError, InvalidAdapterNameError, StateWriteError


def _peft_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("bad", ["../etc", "/abs", "a/b", "a\\b", "..", "", ".hidden", "x..y", "name@../v", "a@b/c"])
def test_names_that_could_leave_the_root_are_refused(bad: str) -> None:
    """Path separators, '..', absolute paths and empty names are InvalidAdapterNameError."""
    with pytest.raises(InvalidAdapterNameError, match="invalid adapter"):
        AdapterSpec.parse(bad)


def test_specs_and_keys() -> None:
    """A spec is parsed once into (name, version or None); keys print as name@version."""
    assert AdapterSpec.parse("legal") == AdapterSpec("legal") and AdapterSpec.parse("legal@2") == ("legal", "2")
    assert str(AdapterSpec("legal")) == "legal" and str(AdapterKey("legal", "2")) == "legal@2"


def spec(text: str) -> AdapterSpec:
    return AdapterSpec.parse(text)


def test_root_layouts_and_versions(tmp_path: Path) -> None:
    """<root>/<name>/ is version '1'; <root>/<name>/<v>/ are versions, the highest current; name@v pins one."""
    _peft_dir(tmp_path / "flat")
    _peft_dir(tmp_path / "multi" / "1")
    _peft_dir(tmp_path / "multi" / "2")
    _peft_dir(tmp_path / "multi" / "10")
    reg = AdapterRegistry(root=tmp_path)
    assert reg.resolve(spec("flat")) == (AdapterKey("flat", "1"), tmp_path / "flat")
    assert reg.resolve(spec("multi"))[0].version == "10"  # numeric, not lexical, order
    assert reg.resolve(spec("multi@2"))[1] == tmp_path / "multi" / "2"
    assert reg.names() == ["flat", "multi"]
    with pytest.raises(AdapterNotFoundError, match="no version '7'"):
        reg.resolve(spec("multi@7"))


def test_not_found_says_where_it_looked(tmp_path: Path) -> None:
    """The error names the directory that was searched, or says no root is set."""
    with pytest.raises(AdapterNotFoundError, match=f"no directory {tmp_path / 'ghost'}"):
        AdapterRegistry(root=tmp_path).resolve(spec("ghost"))
    with pytest.raises(AdapterNotFoundError, match="no --adapter-dir is set"):
        AdapterRegistry().resolve(spec("ghost"))


def test_symlink_out_of_root_is_not_followed(tmp_path: Path) -> None:
    """A link inside the root that points outside it is treated as absent."""
    outside = _peft_dir(tmp_path / "outside" / "secret")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "escape")
    with pytest.raises(AdapterNotFoundError):
        AdapterRegistry(root=root).resolve(spec("escape"))


def test_registry_survives_restart(tmp_path: Path) -> None:
    """Run-time registrations, promotions and pins are written atomically and read back by a new registry."""
    state = tmp_path / "state" / "registry.json"
    a1, a2 = _peft_dir(tmp_path / "a1"), _peft_dir(tmp_path / "a2")
    reg = AdapterRegistry(state_file=state)
    assert reg.register(spec("legal"), a1) == AdapterKey("legal", "1")
    assert reg.register(spec("legal"), a2, promote=False) == AdapterKey("legal", "2")
    assert reg.resolve(spec("legal"))[0].version == "1"
    reg.promote("legal", "2")
    reg.set_pinned("legal", True)
    reg.register(spec("static"), a1, persistent=False)
    assert json.loads(state.read_text())["adapters"]["legal"]["current"] == "2"
    # No temp file left behind; the lock file orders writers sharing the registry.
    assert sorted(p.name for p in state.parent.iterdir()) == ["registry.json", "registry.json.lock"]

    again = AdapterRegistry(state_file=state)
    assert again.resolve(spec("legal")) == (AdapterKey("legal", "2"), a2)
    assert again.resolve(spec("legal@1"))[1] == a1
    assert again.entries["legal"].pinned
    assert "static" not in again.entries  # registered with persistent=False: not saved


def test_unreadable_registry_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "registry.json"
    state.write_text("{broken")
    with pytest.raises(AdapterNotFoundError, match="registry .* is unreadable"):
        AdapterRegistry(state_file=state)


def test_host_cache_lru_refs_and_pins() -> None:
    """Capacity holds; LRU goes first; referenced and pinned entries are never evicted."""
    held: set[str] = set()  # what the owner (the manager) says a request or a pin holds
    cache: HostCache[str, int] = HostCache(capacity=2, held=held.__contains__)
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    cache.get("a")  # a is now most recently used
    assert cache.put("c", 3) == ["b"]
    held.add("a")  # a request uses it
    held.add("c")  # a pin holds it
    assert cache.put("d", 4) == []  # a and c held: over capacity rather than evict either
    assert sorted(cache.keys()) == ["a", "c", "d"]
    held.discard("a")
    assert cache.put("e", 5) == ["a", "d"]
    assert sorted(cache.keys()) == ["c", "e"]


def test_host_cache_uncached_entries_sit_outside_the_capacity() -> None:
    """An entry the owner's policy does not cache neither counts nor evicts, and is never evicted; once the policy
    caches it, it is an ordinary entry (counting, and evicting the least recently used one)."""
    uncached = {"t"}  # the owner's admission policy: everything but t
    cache: HostCache[str, int] = HostCache(capacity=2, cached=lambda k: k not in uncached)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.put("t", 3) == [] and sorted(cache.keys()) == ["a", "b", "t"] and cache.uncached() == ["t"]
    assert cache.shrink() == [] and cache.put("c", 4) == ["a"]  # t is skipped: b, c and the uncached t remain
    uncached.clear()  # the policy now caches t
    assert cache.shrink() == ["b"] and cache.uncached() == []
    assert sorted(cache.keys()) == ["c", "t"]


def test_retired_versions_stay_retired_across_restarts(tmp_path: Path) -> None:
    """Versions are immutable even over a restart: an unloaded name's old versions are never handed out again."""
    state = tmp_path / "registry.json"
    reg = AdapterRegistry(state_file=state)
    reg.register(spec("legal"), _peft_dir(tmp_path / "a1"))
    reg.register(spec("legal"), _peft_dir(tmp_path / "a2"))
    reg.unregister("legal")
    again = AdapterRegistry(state_file=state)
    assert "legal" not in again.entries
    assert again.register(spec("legal"), tmp_path / "a1") == AdapterKey("legal", "3")
    with pytest.raises(AdapterVersionExistsError):
        again.register(spec("legal@2"), tmp_path / "a2")


def test_full_disk_keeps_the_old_state(tmp_path: Path, small_disk: Path) -> None:
    """A registry write that finds the disk full is refused with a named error; memory and file keep the old state,
    and the change succeeds once space is freed."""
    state = small_disk / "registry.json"
    a1, a2 = _peft_dir(tmp_path / "a1"), _peft_dir(tmp_path / "a2")
    reg = AdapterRegistry(state_file=state)
    reg.register(spec("legal"), a1)
    before = state.read_text()
    filler = fill_disk(small_disk)
    with pytest.raises(StateWriteError, match="No space left on device.*not applied") as err:
        reg.register(spec("legal"), a2)
    assert err.value.disk_full
    with pytest.raises(StateWriteError):
        reg.promote("legal", "1")
    with pytest.raises(StateWriteError):
        reg.unregister("legal")
    assert state.read_text() == before
    assert reg.resolve(spec("legal")) == (AdapterKey("legal", "1"), a1)
    assert list(reg.entries["legal"].versions) == ["1"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "registry.json", "registry.json.lock"]  # no temp file
    assert AdapterRegistry(state_file=state).resolve(spec("legal"))[0] == AdapterKey("legal", "1")
    filler.unlink()
    assert reg.register(spec("legal"), a2) == AdapterKey("legal", "2")  # version 2 was never handed out
    assert AdapterRegistry(state_file=state).resolve(spec("legal"))[0] == AdapterKey("legal", "2")
