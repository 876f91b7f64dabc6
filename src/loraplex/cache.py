"""The shared cache under $LORAPLEX_CACHE: converted models (models/loader.py), C++ kernel builds (native.py) and
the demo tenants (training/tenants.py).

Several processes may fill it at once: pytest-xdist workers, two replicas of `loraplex cluster` starting on a fresh
node, a container started twice on one volume. Every entry is therefore made once, under an inter-process file
lock (`filelock`: flock on POSIX, released by the kernel if its holder dies), into a temporary sibling, and
published with one rename. A reader sees a finished entry or none; a process that finds the entry finished by
another, while it waited for the lock, uses that copy instead of making its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))


def lock_path(entry: Path) -> Path:
    """The lock file of `entry`: a hidden sibling, so that listing the cache shows entries only."""
    return entry.parent / f".{entry.name}.lock"


def ensure(entry: Path, done: Callable[[Path], bool], make: Callable[[Path], None], what: str) -> Path:
    """Return `entry` once `done(entry)`; if it is not, make it once across processes.

    `make(tmp)` writes the entry (a file or a directory) at `tmp`, a path that does not exist yet, beside `entry`
    on the same file system; the finished `tmp` is then renamed onto `entry`. A half-made entry is never visible:
    if `make` raises, or the process dies, the temporary is discarded (now, or by the next maker's sweep)."""
    if done(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(entry))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to make %s (%s)", what, entry)
        t0 = time.monotonic()
        lock.acquire()
        log.info("%s made by another process; waited %.1f s", what, time.monotonic() - t0)
    try:
        if done(entry):  # another process made it while this one waited
            return entry
        for stale in entry.parent.glob(f".tmp-{entry.name}-*"):  # left by a maker that died: none runs now
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".tmp-{entry.name}-"))
        try:
            tmp = work / entry.name
            make(tmp)
            if entry.is_dir() and not entry.is_symlink():  # an unfinished entry left by an older version
                shutil.rmtree(entry)
            os.replace(tmp, entry)  # one rename: readers see the old state or the finished entry
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not done(entry):
            raise RuntimeError(f"{what}: {entry} is incomplete after it was made")
        return entry
    finally:
        lock.release()
