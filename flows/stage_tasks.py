"""The driver's stages as Prefect tasks: a ``StageRunner`` whose every stage is a task named as the stage
(``preflight``, ``stage``, ``compute``, ``publish``; run names add the scene), and whose scenes run side by
side as ``scene`` tasks on the flow's task runner. The sequence itself stays the driver's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.states import State

from deeplab_common.errors import DeepLabError
from flows.task_progress import TaskLogProgress
from pipeline.engine.driver import Item, Outcome, StageName, StageRunner
from pipeline.engine.plan import Progress

RETRIED = {"compute": 1}  # stages retried once on an unexpected failure (an actor lost with its node)


def _not_ours(task: Any, run: Any, state: State) -> bool:
    """Retry unexpected failures, but never bad input: it fails the same."""
    try:
        state.result()
    except DeepLabError:
        return False
    except Exception:
        return True
    return False


@task(name="stage", cache_policy=NO_CACHE)
def _stage_task(call: Callable[[Progress], Any]) -> Any:
    return call(TaskLogProgress(get_run_logger()))


@task(name="scene", cache_policy=NO_CACHE)
def _scene_task(call: Callable[[Any], Any], item: Any) -> Any:
    return call(item)


class TaskStages(StageRunner):
    """Runs inside a flow run: each stage a task, each scene's chain a task of its own, scenes overlapping as
    the flow's task runner allows (the compute backend gives them turns)."""

    def __init__(self) -> None:
        super().__init__()
        self.run_id = flow_run_id()

    def stage(self, name: StageName, scene: str, call: Callable[[Progress], Outcome]) -> Outcome:
        retries = RETRIED.get(name, 0)
        runs = _stage_task.with_options(
            name=name,
            task_run_name=f"{name} {scene}",
            retries=retries,
            retry_condition_fn=_not_ours if retries else None,
        )
        result: Any = runs(call)  # a sync task called in a flow returns its value (not a coroutine)
        return cast(Outcome, result)

    def each(
        self, call: Callable[[Item], Outcome], items: Sequence[Item], names: Sequence[str]
    ) -> list[Outcome]:
        futures = [
            _scene_task.with_options(task_run_name=f"scene {name}").submit(call, item)
            for item, name in zip(items, names, strict=True)
        ]
        wait(futures)
        return [future.result() for future in futures]


def flow_run_id() -> str | None:
    """The id of the flow run this code runs in, or None outside one."""
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return None
