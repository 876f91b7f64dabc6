"""The registry keeps admin decisions: an unload is a tombstone (honoured by discovery under the adapter root, across
restarts and between engines sharing the file), unloaded versions never return, and start-up modules
(--lora-modules) never undo an admin's promotion. Registry tests without a model first, then engine tests."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex import LLM, SamplingParams
from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.adapters.registry import AdapterRegistry
from loraplex.engine.admin import ListAdapters, Register, Unregister
from loraplex.engine.llm_engine import LLMEngine
from loraplex.errors import AdapterNotFoundError, AdapterVersionExistsError


def _peft_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def spec(text: str) -> AdapterSpec:
    return AdapterSpec.parse(text)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Path]:
    """An adapter root with `flat` (version 1) and `multi` (versions 1, 2), and its registry file."""
    root = tmp_path / "root"
    _peft_dir(root / "flat")
    _peft_dir(root / "multi" / "1")
    _peft_dir(root / "multi" / "2")
    return root, root / "registry.json"


# ---- unloads are tombstones ----------------------------------------------------------------------

def test_an_unloaded_root_adapter_is_not_rediscovered(store: tuple[Path, Path]) -> None:
    """Unloading an adapter found under the root: the next request is a not-found naming the unload, the catalog
    leaves it out, and a new registry on the same file (a restart) still does."""
    root, state = store
    reg = AdapterRegistry(root, state)
    assert reg.resolve(spec("flat"))[0] == AdapterKey("flat", "1")
    reg.unregister("flat")
    for r in (reg, AdapterRegistry(root, state)):
        with pytest.raises(AdapterNotFoundError, match="'flat' was unloaded by an admin at .*/v1/load_lora_adapter"):
            r.resolve(spec("flat"))
        assert r.names() == ["multi"]
    assert set(json.loads(state.read_text())["tombstones"]) == {"flat"}


def test_a_never_requested_root_adapter_can_be_unloaded(store: tuple[Path, Path]) -> None:
    root, state = store
    reg = AdapterRegistry(root, state)
    reg.unregister("multi")  # never resolved before: found under the root, then unloaded
    with pytest.raises(AdapterNotFoundError, match="unloaded by an admin"):
        reg.resolve(spec("multi@1"))


def test_an_explicit_load_clears_the_tombstone_but_retired_versions_stay_retired(store: tuple[Path, Path]) -> None:
    """After an unload, a load of the name serves it again under a new version; the versions it had (those under
    the root included) are never served again, by discovery, after a restart, or as a version number."""
    root, state = store
    reg = AdapterRegistry(root, state)
    reg.resolve(spec("multi"))
    reg.unregister("multi")
    assert reg.register(spec("multi"), root / "multi" / "1") == AdapterKey("multi", "3")
    for r in (reg, AdapterRegistry(root, state)):
        assert r.resolve(spec("multi"))[0] == AdapterKey("multi", "3")
        for old in ("multi@1", "multi@2"):
            with pytest.raises(AdapterNotFoundError, match="was unloaded and is retired"):
                r.resolve(spec(old))
        assert sorted(r.entries["multi"].versions) == ["3"]
    with pytest.raises(AdapterVersionExistsError):
        reg.register(spec("multi@2"), root / "multi" / "2")
    assert "tombstones" in json.loads(state.read_text()) and not json.loads(state.read_text())["tombstones"]


def test_a_version_added_under_the_root_after_an_unload_is_not_served(store: tuple[Path, Path]) -> None:
    """The tombstone is on the name: a new directory version under an unloaded name is not discovered either."""
    root, state = store
    reg = AdapterRegistry(root, state)
    reg.unregister("multi")
    _peft_dir(root / "multi" / "3")
    with pytest.raises(AdapterNotFoundError, match="unloaded by an admin"):
        AdapterRegistry(root, state).resolve(spec("multi@3"))


def test_engines_sharing_the_file_merge_tombstones(store: tuple[Path, Path]) -> None:
    """An unload on one engine reaches another that had found the adapter under the root (an entry it never
    persisted); the load that clears the tombstone reaches it too, and the merge never brings a retired version back."""
    root, state = store
    a, b = AdapterRegistry(root, state), AdapterRegistry(root, state)
    assert a.resolve(spec("multi"))[0] == b.resolve(spec("multi"))[0] == AdapterKey("multi", "2")
    a.unregister("multi")
    b.refresh()
    assert "multi" in b.take_changes() and "multi" not in b.entries
    with pytest.raises(AdapterNotFoundError, match="unloaded by an admin"):
        b.resolve(spec("multi"))
    b.resolve(spec("flat"))  # b now finds flat under the root; a unloads it before b reads the file again
    a.unregister("flat")
    a.register(spec("flat"), root / "flat")  # cleared at once: flat@2
    b.refresh()
    assert sorted(b.entries["flat"].versions) == ["2"] and b.resolve(spec("flat"))[0] == AdapterKey("flat", "2")
    with pytest.raises(AdapterNotFoundError, match="retired"):
        b.resolve(spec("flat@1"))


# ---- start-up modules never undo admin decisions ----------------------------------------------------

def test_same_startup_weights_are_no_change(tmp_path: Path) -> None:
    """The same module on every restart keeps its one version, and says so."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    assert AdapterRegistry(state_file=state).register_startup("legal", p, "d1") == (
        AdapterKey("legal", "1"), "legal: registered as legal@1")
    again = AdapterRegistry(state_file=state)
    kept = (AdapterKey("legal", "1"), "legal: same weights as legal@1, kept")
    assert again.register_startup("legal", p, "d1") == kept
    assert list(again.entries["legal"].versions) == ["1"]


def test_startup_modules_keep_an_admins_promotion(tmp_path: Path) -> None:
    """An admin loads legal@2 over a start-up legal@1: a restart with the same flags keeps legal@2 current, and one
    with changed weights adds legal@3 without making it current."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    AdapterRegistry(state_file=state).register_startup("legal", p, "d1")
    AdapterRegistry(state_file=state).register(spec("legal"), p, digest="d2")  # promoted by the admin
    key, line = AdapterRegistry(state_file=state).register_startup("legal", p, "d1")
    assert key == AdapterKey("legal", "1")
    assert line == ("legal: same weights as legal@1, kept; legal@2 stays current (promoted by an admin: promote the "
                    "new one with POST /v1/promote_lora_adapter)")
    reg = AdapterRegistry(state_file=state)
    key, line = reg.register_startup("legal", p, "d3")
    assert key == AdapterKey("legal", "3")
    assert line.startswith("legal: new weights registered as legal@3; legal@2 stays current")
    assert reg.current("legal") == "2" and AdapterRegistry(state_file=state).current("legal") == "2"
    reg.promote("legal", "1")  # an admin's promotion back to the first weights: kept as well
    assert AdapterRegistry(state_file=state).register_startup("legal", p, "d3")[0] == AdapterKey("legal", "3")
    assert AdapterRegistry(state_file=state).current("legal") == "1"


def test_changed_startup_weights_become_current_where_the_flags_chose(tmp_path: Path) -> None:
    """Without an admin's promotion, the flags' weights are what is served: new weights are a new current version,
    and weights the name had before make that version current again (no new version)."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    AdapterRegistry(state_file=state).register_startup("legal", p, "d1")
    assert AdapterRegistry(state_file=state).register_startup("legal", p, "d2") == (
        AdapterKey("legal", "2"), "legal: new weights registered as legal@2, current")
    reg = AdapterRegistry(state_file=state)
    assert reg.register_startup("legal", p, "d1") == (
        AdapterKey("legal", "1"), "legal: same weights as legal@1, current again (was legal@2)")
    assert AdapterRegistry(state_file=state).current("legal") == "1"


def test_an_admins_unload_outlasts_unchanged_startup_flags(tmp_path: Path) -> None:
    """A start-up module an admin unloaded stays unloaded while its weights are unchanged; new weights (the operator's
    later decision) register a new version and clear the tombstone."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    AdapterRegistry(state_file=state).register_startup("legal", p, "d1")
    AdapterRegistry(state_file=state).unregister("legal")
    reg = AdapterRegistry(state_file=state)
    key, line = reg.register_startup("legal", p, "d1")
    assert key is None and "stays unloaded" in line
    with pytest.raises(AdapterNotFoundError, match="unloaded by an admin"):
        reg.resolve(spec("legal"))
    key, line = AdapterRegistry(state_file=state).register_startup("legal", p, "d2")
    assert key == AdapterKey("legal", "2") and "current (an admin unloaded it at" in line
    assert AdapterRegistry(state_file=state).resolve(spec("legal"))[0] == AdapterKey("legal", "2")


def test_names_the_flags_drop_leave_unless_an_admin_took_them(tmp_path: Path) -> None:
    """A name only start-up flags decided about leaves with its flag (its version stays retired); one an admin
    promoted stays."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    first = AdapterRegistry(state_file=state)
    for name in ("a", "b", "c"):
        first.register_startup(name, p, "d-" + name)
    first.register(spec("b"), p, digest="d-b2")
    assert AdapterRegistry(state_file=state).drop_startup_leftovers({"a", "b", "c"}) == []
    reg = AdapterRegistry(state_file=state)
    assert reg.drop_startup_leftovers({"c"}) == ["a: no longer in --lora-modules, unregistered",
                                                 "b: no longer in --lora-modules, kept: an admin promoted b@2"]
    again = AdapterRegistry(state_file=state)
    assert sorted(again.entries) == ["b", "c"] and "a" not in again.tombstones
    assert again.register_startup("a", p, "d-a") == (AdapterKey("a", "2"), "a: registered as a@2")


def test_replicas_starting_with_the_same_flags_share_one_version(tmp_path: Path) -> None:
    """Two engines on one registry file start with the same module: one version; a second replica's start does not
    undo the promotion an admin made through the first."""
    state, p = tmp_path / "registry.json", _peft_dir(tmp_path / "p")
    a, b = AdapterRegistry(state_file=state), AdapterRegistry(state_file=state)
    assert a.register_startup("legal", p, "d1")[0] == AdapterKey("legal", "1")
    assert b.register_startup("legal", p, "d1") == (AdapterKey("legal", "1"), "legal: same weights as legal@1, kept")
    a.register(spec("legal"), p, digest="d2")
    assert AdapterRegistry(state_file=state).register_startup("legal", p, "d1")[0] == AdapterKey("legal", "1")
    b.refresh()
    assert b.current("legal") == "2"


# ---- on a real engine ------------------------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def weights(adapter_factory: Callable[..., Path]) -> list[Path]:
    return [adapter_factory(f"decide{i}", r=4, targets=["q_proj", "v_proj"], seed=400 + i) for i in range(3)]


def _engine(root: Path, **kw: object) -> LLMEngine:
    return LLM(dtype="float32", adapter_dir=str(root), registry_file=str(root / "registry.json"),
               max_model_len=128, kv_cache_memory=16 << 20, **kw).engine  # type: ignore[arg-type]


def _answer(e: LLMEngine, model: str) -> list[int]:
    e.add_request([1, 2, 3, 4], PARAMS, model, request_id=model)
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                assert out.error is None, out.error
                return list(out.outputs[0].token_ids)
    raise AssertionError("no output")


def test_engine_unload_of_a_root_adapter_sticks_across_a_restart(tmp_path: Path, weights: list[Path]) -> None:
    root = tmp_path / "root"
    shutil.copytree(weights[0], root / "g0")
    e = _engine(root)
    before = _answer(e, "g0")
    e.admin(Unregister("g0"))
    with pytest.raises(AdapterNotFoundError, match="'g0' was unloaded by an admin"):
        e.add_request([1, 2, 3], PARAMS, "g0")
    restarted = _engine(root)
    with pytest.raises(AdapterNotFoundError, match="'g0' was unloaded by an admin"):
        restarted.add_request([1, 2, 3], PARAMS, "g0")
    assert "g0" not in {a.name for a in restarted.admin(ListAdapters())}
    assert restarted.admin(Register("g0", root / "g0")) == AdapterKey("g0", "2")  # cleared by an explicit load
    assert _answer(restarted, "g0") == before


def test_engine_restart_with_the_same_flags_keeps_an_admins_promotion(tmp_path: Path, weights: list[Path],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """legal=w0 at start, an admin loads w1 as legal@2: restarts with legal=w0 keep legal@2 (no new version, the log
    says so); a restart with legal=w2 adds legal@3 and still serves legal@2."""
    root = tmp_path / "root"
    root.mkdir()
    e1 = _engine(root, lora_modules={"legal": str(weights[0])})
    e1.admin(Register("legal", weights[1]))
    promoted = _answer(e1, "legal")
    with caplog.at_level(logging.INFO, logger="loraplex.adapters.manager"):
        e2 = _engine(root, lora_modules={"legal": str(weights[0])})
    assert "start-up adapter legal: same weights as legal@1, kept; legal@2 stays current" in caplog.text
    assert e2.adapters.registry.entries["legal"].versions.keys() == {"1", "2"} and _answer(e2, "legal") == promoted
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraplex.adapters.manager"):
        e3 = _engine(root, lora_modules={"legal": str(weights[2])})
    assert "start-up adapter legal: new weights registered as legal@3; legal@2 stays current" in caplog.text
    assert e3.adapters.registry.current("legal") == "2" and _answer(e3, "legal") == promoted
    assert _answer(e3, "legal@3") != promoted
