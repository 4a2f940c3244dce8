"""SIGTERM handled as Ctrl-C is: Kubernetes, Prefect and ``timeout`` stop a run with SIGTERM, and a stopped
run must leave as an interrupted one does (its partial outputs cleaned, the lock released, no Ray process
left, one line, exit 143) rather than as Ray's handler would (a C++ stack dump, exit 134)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

TERMINATED_EXIT = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: every ``except KeyboardInterrupt`` and ``finally`` runs."""


_received = threading.Event()  # Ray's waits turn any interrupt into a plain KeyboardInterrupt: kept here


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    _received.set()
    raise Terminated


def was_terminated() -> bool:
    """Whether this process received SIGTERM (since ``terminate_as_interrupt``)."""
    return _received.is_set()


def terminate_as_interrupt() -> None:
    """From now on SIGTERM raises ``Terminated`` in the main thread (a no-op elsewhere: only it may)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """Around a library that installs its own SIGTERM handler (``ray.init``): the Python handler set before
    it (the CLI's) is put back after it. Without one, the library's stays."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)
