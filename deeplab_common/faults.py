"""Crashes on purpose, for tests: with ``DEEPLAB_CRASH_AT=POINT:N`` set, this process SIGKILLs itself the
Nth time it passes ``POINT``, as a power cut or the OOM killer would, so that a test places a kill in each
stage deterministically instead of at a random time (``bench/chaos.py`` keeps the random ones).
``POINT:N:TERM`` sends SIGTERM instead, as Kubernetes or Prefect stopping the run would.

The points: ``stage-block`` (a block of the scene written into its zarr store), ``ledger-core`` (a core's
labels and its ledger line made durable), ``publish-rename`` (one output moved from the partial folder into
the scene's). Unset, as it always is outside tests, a pass costs one environment lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Literal

CRASH_ENV = "DEEPLAB_CRASH_AT"
CrashPoint = Literal["stage-block", "ledger-core", "publish-rename"]

_passes: Counter[str] = Counter()


def passing(point: CrashPoint) -> None:
    """Count a pass of ``point``; the Nth one named in ``DEEPLAB_CRASH_AT`` kills this process at once."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    if name != point:
        return
    count, _, sent = rest.partition(":")
    _passes[point] += 1
    if _passes[point] == int(count or 1):  # once: a stopped run may pass the point again while it ends
        # this process alone: never the shell's process group
        os.kill(os.getpid(), signal.SIGTERM if sent == "TERM" else signal.SIGKILL)
