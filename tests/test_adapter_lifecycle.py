"""Adapter lifecycle on a real engine: just-in-time loads from the adapter root, failures that don't poison
the cache, reference-counted slots, versions promoted mid-flight, persistence, pinning, LRU tiers, fairness."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ALL, ATTN, MLP
from loraplex import LLM, SamplingParams
from loraplex.adapters.key import AdapterKey, AdapterSpec
from loraplex.config import EngineConfig
from loraplex.engine.admin import Pin, Promote, Register, Unregister
from loraplex.engine.llm_engine import LLMEngine
from loraplex.errors import AdapterFormatError, AdapterNotFoundError, InvalidAdapterNameError, InvalidRequestError

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
TARGETS = [ATTN, MLP, ALL]


@pytest.fixture(scope="module")
def root(adapter_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with g0..g5 (flat layout), 'versioned' (1/ and 2/), and 'broken' (corrupt weights)."""
    root = tmp_path_factory.mktemp("root")
    for i in range(6):
        shutil.copytree(adapter_factory(f"life{i}", r=4 + i, targets=TARGETS[i % 3], seed=200 + i), root / f"g{i}")
    shutil.copytree(adapter_factory("life0"), root / "versioned" / "1")
    shutil.copytree(adapter_factory("life1"), root / "versioned" / "2")
    shutil.copytree(adapter_factory("life2"), root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    return root


def engine(root: Path, **kw: object) -> LLMEngine:
    return LLM(dtype="float32", adapter_dir=str(root), **kw).engine  # type: ignore[arg-type]


def prompt(e: LLMEngine, i: int = 0) -> list[int]:
    text = ["Name a colour.", "Say hi.", "Count to three.", "Name a city."][i % 4]
    return e.tokenizer.encode(e.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                              add_generation_prompt=True, tokenize=False), add_special_tokens=False)


def run(e: LLMEngine, jobs: dict[str, tuple[list[int], str | None]], max_steps: int = 10_000) -> dict[str, object]:
    """Add every job, step to completion; request id -> token ids, or the error it failed with."""
    for rid, (p, a) in jobs.items():
        e.add_request(p, PARAMS, a, request_id=rid)
    done: dict[str, object] = {}
    for _ in range(max_steps):
        if not e.has_unfinished_requests():
            break
        for out in e.step():
            if out.finished:
                done[out.request_id] = out.error or out.outputs[0].token_ids
    return done


@pytest.fixture(scope="module")
def solo(root: Path) -> dict[str, list[int]]:
    """Each of g0..g5 and versioned@1/@2 run alone, on an engine with plenty of slots."""
    e = engine(root, max_loras=8)
    names = [f"g{i}" for i in range(6)] + ["versioned@1", "versioned@2"]
    return {n: run(e, {n: (prompt(e), n)})[n] for n in names}  # type: ignore[misc]


def test_just_in_time_load_from_root(root: Path, solo: dict[str, list[int]]) -> None:
    """An adapter under the root that nobody registered loads on demand (a host miss, one disk load)."""
    e = engine(root)
    assert run(e, {"r": (prompt(e), "g3")})["r"] == solo["g3"]
    m = e.adapters.metrics
    assert m.misses["host"] == 1 and m.loads["host"] == 1 and m.loads["device"] == 1
    assert run(e, {"r2": (prompt(e), "g3")})["r2"] == solo["g3"]
    assert m.hits["host"] == 1 and m.loads["host"] == 1  # warm the second time


def test_missing_and_escaping_names(root: Path) -> None:
    """Unknown names say where they were looked for; names that could leave the root are refused."""
    e = engine(root)
    with pytest.raises(AdapterNotFoundError, match=f"no directory {root / 'nobody'}"):
        e.add_request(prompt(e), PARAMS, "nobody")
    for bad in ["../g0", "/etc/passwd", "g0/../../x", ".."]:
        with pytest.raises(InvalidAdapterNameError):
            e.add_request(prompt(e), PARAMS, bad)
    assert not e.has_unfinished_requests()


def test_failed_load_reaches_every_waiter_and_is_retried(root: Path, solo: dict[str, list[int]], tmp_path: Path) -> None:
    """A corrupt adapter fails each request waiting on it, others complete, and a later request tries again."""
    local = tmp_path / "root"
    shutil.copytree(root, local)
    e = engine(local)
    done = run(e, {"b1": (prompt(e), "broken"), "b2": (prompt(e, 1), "broken"), "ok": (prompt(e), "g0")})
    assert isinstance(done["b1"], AdapterFormatError) and isinstance(done["b2"], AdapterFormatError)
    assert "corrupt safetensors" in str(done["b1"])
    assert done["ok"] == solo["g0"]
    broken = AdapterKey("broken", "1")
    assert broken not in e.adapters.slots.slot_of and not e.adapters.ready(broken)  # nothing half-loaded
    shutil.copy(local / "g1" / "adapter_model.safetensors", local / "broken" / "adapter_model.safetensors")
    shutil.copy(local / "g1" / "adapter_config.json", local / "broken" / "adapter_config.json")
    assert run(e, {"b3": (prompt(e), "broken")})["b3"] == solo["g1"]


def test_three_times_more_adapters_than_slots(root: Path, solo: dict[str, list[int]]) -> None:
    """18 concurrent requests over 6 adapters with 2 device slots and 3 host entries: all complete, each with
    its solo tokens; slots and host entries are reused without evicting an adapter in use."""
    e = engine(root, max_loras=2, max_cpu_loras=3)
    jobs = {f"r{i}": (prompt(e), f"g{i % 6}") for i in range(18)}
    done = run(e, jobs)
    assert {rid: done[rid] for rid in jobs} == {rid: solo[a] for rid, (_, a) in jobs.items()}  # type: ignore[misc]
    assert e.adapters.slots.evictions > 0 and e.adapters.metrics.evictions["host"] > 0
    assert not e.adapters.slots.refs and not e.adapters.users  # every reference returned


def test_lru_order_in_both_tiers(root: Path) -> None:
    """With 2 slots and 2 host entries, a, b, a, c evicts b (least recently used) from both tiers."""
    e = engine(root, max_loras=2, max_cpu_loras=2)
    for name in ["g0", "g1", "g0", "g2"]:
        run(e, {name + str(len(e.adapters.host)): (prompt(e), name)})
    kept = [AdapterKey("g0", "1"), AdapterKey("g2", "1")]
    assert sorted(e.adapters.slots.slot_of) == kept and sorted(e.adapters.host.keys()) == kept
    assert e.adapters.slots.evictions == 1 and e.adapters.metrics.evictions["host"] == 1


def test_a_transient_adapter_evicts_nothing_and_leaves_with_its_request(root: Path, solo: dict[str, list[int]]) -> None:
    """An adapter the host admission policy does not cache (a cluster replica serving one it does not claim): with
    the host tier full, it loads beside the cached entries, answers as usual and is gone afterwards; the cached
    entries stay. Once the policy caches it (a claim), a request's copy becomes a cached entry, evicting the least
    recently used one."""
    claimed = {"g0", "g1"}
    e = LLMEngine(EngineConfig(dtype="float32", adapter_dir=str(root), max_loras=2, max_cpu_loras=2),
                  host_admission=lambda key: key.name in claimed)
    for name in ["g0", "g1"]:
        run(e, {name: (prompt(e), name)})
    cached = [AdapterKey("g0", "1"), AdapterKey("g1", "1")]
    e.add_request(prompt(e), PARAMS, "g2", request_id="t1")
    assert run(e, {})["t1"] == solo["g2"]
    assert sorted(e.adapters.host.keys()) == cached and e.adapters.metrics.evictions["host"] == 0
    assert e.adapters.metrics.loads["host"] == 3 and not e.adapters.host.uncached()
    e.add_request(prompt(e), PARAMS, "g2", request_id="t2")
    claimed.add("g2")  # claimed while its copy is in use: the copy becomes the tier's
    assert run(e, {})["t2"] == solo["g2"]
    assert sorted(e.adapters.host.keys()) == [AdapterKey("g1", "1"), AdapterKey("g2", "1")]
    assert e.adapters.metrics.loads["host"] == 4 and e.adapters.metrics.evictions["host"] == 1
    assert not e.adapters.users  # the one count of requests per version (the host tier asks it)


def test_version_promoted_mid_flight(root: Path, solo: dict[str, list[int]], tmp_path: Path) -> None:
    """A request running on v1 finishes on v1 after v2 is registered and promoted; new requests get v2;
    v1's weights are freed once its last request finishes."""
    e = engine(tmp_path, registry_file=str(tmp_path / "reg.json"))
    assert e.admin(Register("tenant", root / "versioned" / "1")) == AdapterKey("tenant", "1")
    e.add_request(prompt(e), PARAMS, "tenant", request_id="old")
    e.step()
    e.step()
    assert str(e.admin(Register("tenant", root / "versioned" / "2"))) == "tenant@2"  # promoted at once
    e.add_request(prompt(e), PARAMS, "tenant", request_id="new")
    done = {}
    while e.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in e.step() if o.finished})
    assert done["old"] == solo["versioned@1"] and done["new"] == solo["versioned@2"]
    assert solo["versioned@1"] != solo["versioned@2"]
    old = AdapterKey("tenant", "1")
    assert old not in e.adapters.host and old not in e.adapters.slots.slot_of


def test_registry_persists_across_restart(root: Path, solo: dict[str, list[int]], tmp_path: Path) -> None:
    """Adapters registered and promoted at run time are served by a new engine on the same registry file."""
    reg = str(tmp_path / "registry.json")
    e1 = engine(tmp_path, registry_file=reg)
    e1.admin(Register("rt", root / "g4"))
    e1.admin(Register("rt", root / "g5", promote=False))
    e1.admin(Promote("rt", "2"))
    e2 = engine(tmp_path, registry_file=reg)
    done = run(e2, {"cur": (prompt(e2), "rt"), "old": (prompt(e2), "rt@1")})
    assert done == {"cur": solo["g5"], "old": solo["g4"]}


def test_pinned_adapter_stays_in_a_slot(root: Path, solo: dict[str, list[int]]) -> None:
    """A pinned adapter is placed in a device slot and survives traffic that cycles others through the rest."""
    e = engine(root, max_loras=2)
    e.admin(Pin("g0"))
    e.adapters.wait()
    for i in range(1, 6):
        assert run(e, {f"r{i}": (prompt(e), f"g{i}")})[f"r{i}"] == solo[f"g{i}"]
        assert AdapterKey("g0", "1") in e.adapters.slots.slot_of
    assert e.adapters.slots.evictions >= 3  # the other slot was reused, never the pinned one
    with pytest.raises(InvalidRequestError, match="at most 1 adapters may be pinned"):
        e.admin(Pin("g1"))


def test_rare_adapter_is_not_starved(root: Path) -> None:
    """With one slot held by a steady stream of requests for g0, a request for g1 is overtaken at most
    max_skips times, then runs, although g0 requests keep arriving."""
    e = engine(root, max_loras=1, max_skips=3)
    e.admin(Register("g0", root / "g0"))
    e.admin(Register("g1", root / "g1"))
    e.add_request(prompt(e), PARAMS, "g0", request_id="a0")
    e.step()
    e.add_request(prompt(e), PARAMS, "g1", request_id="rare")
    rare = e.requests["rare"]
    finished = None
    for step in range(1, 300):
        e.add_request(prompt(e), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "g0", request_id=f"a{step}")
        if any(o.request_id == "rare" and o.finished for o in e.step()):
            finished = step
            break
    assert finished is not None, "the rare adapter's request never ran"
    assert rare.times_passed_over <= 3


def test_stats_count_tiers_and_requests(root: Path) -> None:
    """adapter_stats reports loads, hits, misses, evictions, residency per tier and per-adapter queues."""
    e = engine(root, max_loras=1, max_cpu_loras=1)
    e.adapters.prefetch(AdapterSpec("g0"))
    e.adapters.wait()
    e.step()  # collects the finished background load
    for i in range(3):
        e.add_request(prompt(e), PARAMS, "g0", request_id=f"a{i}")
    e.add_request(prompt(e), PARAMS, "g1", request_id="b")
    e.step()
    s = e.adapter_stats()
    assert s.running == {"g0": 3} and s.queued == {"g1": 1}
    while e.has_unfinished_requests():
        e.step()
    s = e.adapter_stats()
    assert s.loads == {"host": 2, "device": 2} and s.load_failures == 0
    assert s.misses["device"] == 2 and s.hits["device"] == 2 and s.evictions["device"] == 1
    assert s.hits["host"] == 3 and s.misses["host"] == 1 and s.evictions["host"] == 1
    assert s.resident == {"host": 1, "device": 1} and s.queued == {} and s.running == {}
    assert s.load_latency["host"].n == 2 and s.load_latency["device"].n == 2


@pytest.mark.slow
def test_registration_racing_decoding_is_safe(root: Path, solo: dict[str, list[int]]) -> None:
    """A thread registers, promotes, pins, unpins and unregisters versions of an adapter as fast as it can while
    the engine thread decodes requests on it: every request either is refused at admission (unregistered at that
    moment) or returns exactly the solo tokens of the version it was admitted under, nothing raises, and every
    slot and reference comes back."""
    import threading
    import time

    e = engine(root, max_loras=2, max_cpu_loras=3)
    # Versions count up, never reused (not even after an unregistration): version v has g{v % 2}'s weights.
    weights = {0: root / "g0", 1: root / "g1"}
    assert e.admin(Register("hot", weights[1])).version == "1"
    stop, failures, changes = threading.Event(), [], [0]

    def admin() -> None:
        while not stop.is_set():
            try:
                n = changes[0]
                key = e.admin(Register("hot", weights[n % 2], promote=n % 3 != 0))  # version n + 2
                if n % 4 == 1:
                    e.admin(Promote("hot", key.version))
                if n % 5 == 2:
                    e.admin(Pin("hot", True))
                if n % 5 == 3:
                    e.admin(Pin("hot", False))
                if n % 7 == 6:
                    e.admin(Unregister("hot"))
            except AdapterNotFoundError:
                pass  # pinned or promoted between an unregistration and the next registration
            except Exception as ex:  # noqa: BLE001 - any other error is the test's failure
                failures.append(ex)
                return
            changes[0] += 1
            time.sleep(0.01)  # a change every few engine steps, not a loader hogging the cores

    thread = threading.Thread(target=admin)
    thread.start()
    admitted: dict[str, str] = {}
    done: dict[str, object] = {}
    try:
        for i in range(40):
            try:
                e.add_request(prompt(e), PARAMS, "hot", request_id=f"r{i}")
                admitted[f"r{i}"] = e.requests[f"r{i}"].adapter.version  # type: ignore[union-attr]
            except AdapterNotFoundError:
                pass
            for out in e.step():
                if out.finished:
                    done[out.request_id] = out.error or out.outputs[0].token_ids
        while e.has_unfinished_requests():
            for out in e.step():
                if out.finished:
                    done[out.request_id] = out.error or out.outputs[0].token_ids
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert changes[0] > 10 and len(admitted) > 10  # both sides really ran concurrently
    assert {rid: done[rid] for rid in admitted} == {rid: solo[f"g{int(v) % 2}"] for rid, v in admitted.items()}
    assert not e.adapters.slots.refs and not e.adapters.users and e.blocks.num_free == e.blocks.num_blocks
