"""Terminal progress for `deeplab segment`: one line per scene and stage, core counts every tenth."""

from __future__ import annotations

import time

from rich.console import Console

from pipeline.engine.plan import CoreDone


class ConsoleProgress:
    """Plain lines rather than a live bar: nightly runs are logged to files, where bars vanish."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def stage(self, scene: str, stage: str, detail: str = "") -> None:
        suffix = f": {detail}" if detail else ""
        self.console.print(f"[bold]{scene}[/bold] {stage}{suffix}", highlight=False, soft_wrap=True)

    def cores(self, scene: str, total: int) -> CoreDone:
        started = time.perf_counter()
        done = 0
        step = max(1, total // 10)

        def one() -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                rate = done / max(time.perf_counter() - started, 1e-9)
                self.console.print(
                    f"[bold]{scene}[/bold] compute: {done}/{total} cores ({rate:.2f}/s)", highlight=False
                )

        return one
