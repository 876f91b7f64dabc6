"""The shared cache ($LORAPLEX_CACHE) under concurrent first use: processes that start at once on an empty cache
(xdist workers, replicas on a fresh node) all come up, with one conversion and one build between them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraplex.cache import ensure
from server_util import dies_with_this_process

# One process's first use: the default model's conversion and the LoRA kernel's build, then what they produced.
FIRST_USE = """
import hashlib, json, logging
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from loraplex import native
from loraplex.models.loader import resolve_model

model = resolve_model(None)
lib = native.build(Path(native.__file__).parent / "lora" / "csrc" / "lora_cpu.cpp", native.compiler())
print(json.dumps({"model": str(model), "lib": str(lib),
                  "weights": hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest(),
                  "lib_bytes": hashlib.sha256(lib.read_bytes()).hexdigest()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_processes_on_an_empty_cache_all_come_up_alike(tmp_path: Path) -> None:
    if native_compiler() is None:
        pytest.skip("no C++ compiler: no kernel to build")
    env = {**os.environ, "LORAPLEX_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=dies_with_this_process) for _ in range(4)]
    try:
        outs = [p.communicate(timeout=540) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r == results[0] for r in results), results
    converted = [d for d in (tmp_path / "models").iterdir() if not d.name.startswith(".")]
    assert [d.name for d in converted] == [Path(results[0]["model"]).name]
    assert not list((tmp_path / "models").glob(".tmp-*")), "a temporary was left behind"
    assert not list((tmp_path / "kernels").glob(".tmp-*")), "a temporary was left behind"
    # One conversion between them: the others waited for it instead of converting their own.
    assert sum(err.count("converting") for _, err in outs) == 1, [err[-2000:] for _, err in outs]


def native_compiler() -> list[str] | None:
    from loraplex import native

    return native.compiler()


def test_a_maker_that_fails_leaves_nothing_and_the_next_one_makes_it(tmp_path: Path) -> None:
    entry = tmp_path / "entry"

    def fail(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure(entry, lambda d: (d / "done").is_file(), fail, what="a test entry")
    assert not entry.exists() and not list(tmp_path.glob(".tmp-*"))

    def make(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "done").write_text("ok")

    assert ensure(entry, lambda d: (d / "done").is_file(), make, what="a test entry") == entry
    assert (entry / "done").read_text() == "ok"


def test_threads_racing_for_one_entry_make_it_once(tmp_path: Path) -> None:
    """The lock holds between threads of one process too (filelock is reentrant per thread only)."""
    entry = tmp_path / "entry.bin"
    made: list[int] = []
    barrier = threading.Barrier(4)

    def make(tmp: Path) -> None:
        made.append(1)
        tmp.write_bytes(hashlib.sha256(b"payload").digest())

    def worker() -> None:
        barrier.wait()
        ensure(entry, Path.is_file, make, what="a test entry")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(made) == 1
    assert entry.read_bytes() == hashlib.sha256(b"payload").digest()


def test_a_dead_makers_temporary_is_swept(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (tmp_path / ".tmp-entry-dead").mkdir()  # what a killed process leaves
    ensure(entry, Path.is_file, lambda tmp: tmp.write_text("ok"), what="a test entry")
    assert entry.read_text() == "ok" and not list(tmp_path.glob(".tmp-*"))

