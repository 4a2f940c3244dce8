"""The engine's progress in Prefect task logs: stages as they start, cores every tenth of a scene."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pipeline.engine.plan import CoreDone

# at most one line per this many seconds, besides each tenth of the cores and the last one
MIN_SECONDS_BETWEEN_LINES = 10.0


class TaskLogProgress:
    """Implements ``pipeline.engine.plan.Progress`` on a Prefect run logger."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.logger = logger

    def stage(self, scene: str, stage: str, detail: str = "") -> None:
        self.logger.info("%s: %s%s", scene, stage, f" ({detail})" if detail else "")

    def cores(self, scene: str, total: int) -> CoreDone:
        lock = threading.Lock()
        state = {"done": 0, "next_tenth": 1, "last_line": time.monotonic()}
        started = time.monotonic()

        def done() -> None:
            with lock:
                state["done"] += 1
                count = state["done"]
                now = time.monotonic()
                tenth_reached = count * 10 >= state["next_tenth"] * total
                if not (
                    count == total or tenth_reached or now - state["last_line"] >= MIN_SECONDS_BETWEEN_LINES
                ):
                    return
                while state["next_tenth"] * total <= count * 10:
                    state["next_tenth"] += 1
                state["last_line"] = now
            rate = count / max(now - started, 1e-9)
            self.logger.info("%s: %d/%d cores (%.2f cores/s)", scene, count, total, rate)

        return done
