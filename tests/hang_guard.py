"""A hung test fails with every thread's stack, and its pytest-xdist worker lives on: pytest-timeout's timer,
replaced through its `pytest_timeout_set_timer` hook (the limit itself is pytest-timeout's: pyproject.toml's
`timeout`, or a test's @pytest.mark.timeout).

pytest-timeout's thread method ends the process with os._exit. Under pytest-xdist that loses the stacks (a worker's
terminal is not shown), and the --dist loadfile scheduler hands the crashed test's file, hung test included, to a
fresh worker until the restarts run out: one hung test ran nine times, one limit each. Here a watchdog thread (a
timer that needs nothing from the main thread, as the thread method's) takes every thread's stack at the limit and
interrupts the main thread with SIGALRM; the handler fails the test with those stacks in its report. Its fixtures are
then torn down (their servers stopped) and the next test runs. Where the main thread does not get back to Python
within GRACE_S (stuck in C code), or the teardown hangs as long as the limit, the watchdog falls back to the thread
method's exit, with the stacks written to the process's stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Any

import pytest

GRACE_S = 30.0  # from the interrupt to the main thread raising, before the process is ended instead


def every_stack() -> str:
    """Each thread's stack but the caller's, named."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    return "\n".join(f"--- thread {names.get(ident, '<unknown>')} ({ident}) ---\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items() if ident != me)


def _exit_with(message: str) -> None:
    os.write(2, message.encode(errors="replace"))  # the process's own stderr: the terminal reporter may be muted
    os._exit(1)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if threading.current_thread() is not threading.main_thread():
        return None  # a signal handler needs the main thread: pytest-timeout's own methods serve
    limit = float(settings.timeout)
    done = threading.Event()  # the test's setup, call and teardown are over
    interrupted = threading.Event()  # the main thread took the interrupt
    stacks: list[str] = []
    deciding = threading.Lock()  # the watchdog's interrupt and the test's end exclude each other

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        if done.is_set():
            return  # delivered after the test's end: nothing to interrupt
        interrupted.set()
        pytest.fail(f"Timeout: over {limit:g} s (pytest-timeout). Every thread's stack at the limit:\n{stacks[0]}")

    def watch() -> None:
        if done.wait(limit):
            return
        with deciding:
            if done.is_set():
                return
            stacks.append(every_stack())
            main = threading.main_thread().ident
            assert main is not None
            signal.pthread_kill(main, signal.SIGALRM)
        if not interrupted.wait(GRACE_S):
            _exit_with(f"\n+++ Timeout: {item.nodeid} ran over {limit:g} s and did not return to Python within "
                       f"{GRACE_S:g} s; ending this process. Every thread's stack at the limit:\n{stacks[0]}\n")
        if not done.wait(limit):
            _exit_with(f"\n+++ Timeout: {item.nodeid}'s teardown after its timeout ran over {limit:g} s; ending this "
                       f"process. Every thread's stack now:\n{every_stack()}\n")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    threading.Thread(target=watch, name=f"hang-guard {item.name}", daemon=True).start()

    def cancel() -> None:
        with deciding:
            done.set()
        signal.signal(signal.SIGALRM, previous)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel hook calls it
    return True
