"""The ``segment-scenes`` flow: the batch driver (``pipeline.engine.driver``), one Prefect task per stage.

discover -> preflight (every scene) -> stage -> segment -> publish (each scene) -> report. Each scene runs
as its own chain of tasks, so a scene that fails fails its own tasks and the others go on; the flow's final
state names every failed scene and why. Scenes overlap in preflight, staging and publishing; the Ray step
of one scene uses the whole cluster, so scenes take turns on it.

What a stage does, and which scenes are refused or skipped (an id clash; a result key unchanged since the
last published result, with every output in place), is the driver's: `deeplab segment` runs the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import PrefectFuture, wait
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import artifact_key, batch_table, thumbnail_data_url
from flows.settings import worker_environment
from flows.task_progress import TaskLogProgress
from models.checkpoint import checkpoint_info
from models.errors import DeepLabError
from pipeline.engine.driver import Batch, Cluster, SceneJob, cluster_for
from pipeline.engine.manifest import SceneRecord, now_iso
from pipeline.engine.options import SegmentOptions
from pipeline.engine.report import SceneReport
from pipeline.io.sources import Source

SCENE_THREADS = 4  # scenes in flight at once (preflight, staging and publishing overlap)


class ScenesFailed(DeepLabError):
    """Some scenes of a run failed (the others were published); ``summary`` says which."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _not_ours(task: Any, run: Any, state: State) -> bool:
    """Retry unexpected failures (an actor lost with its node) but never bad input: it fails the same."""
    try:
        state.result()
    except DeepLabError:
        return False
    except Exception:
        return True
    return False


def _progress() -> TaskLogProgress:
    return TaskLogProgress(get_run_logger())


@task(name="discover", cache_policy=NO_CACHE)
def discover(batch: Batch, input: str | list[str]) -> tuple[list[Source], dict[Source, str]]:
    scenes, clashes = batch.discover(input)
    get_run_logger().info("%d scene(s) found, %d refused for a clash of ids", len(scenes), len(clashes))
    return scenes, clashes


@task(name="preflight", task_run_name="preflight {source}", cache_policy=NO_CACHE)
def preflight(batch: Batch, source: Source) -> SceneJob:
    return batch.preflight(source, _progress())


@task(name="stage", task_run_name="stage {job.name}", cache_policy=NO_CACHE)
def stage(batch: Batch, job: SceneJob, cluster: Cluster) -> SceneJob:
    return batch.stage(job, cluster, _progress())


@task(
    name="segment",
    task_run_name="segment {job.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=_not_ours,
)
def segment(batch: Batch, job: SceneJob, cluster: Cluster) -> SceneJob:
    return batch.compute(job, cluster, _progress())


@task(name="publish", task_run_name="publish {job.name}", cache_policy=NO_CACHE)
def publish(batch: Batch, job: SceneJob) -> SceneRecord:
    record, result = batch.publish(job, _progress())
    if result is not None:
        create_image_artifact(
            image_url=thumbnail_data_url(result.quicklook),
            key=f"quicklook-{artifact_key(job.name)}",
            description=f"{job.source}: the mask over the scene ({result.quicklook})",
        )
    return record


@task(name="report", cache_policy=NO_CACHE)
def report(batch: Batch, records: list[SceneRecord], started: str, seconds: float) -> str:
    areas: dict[str, dict[str, float] | None] = {}
    for record in records:
        if record.outputs and "report" in record.outputs:
            published = SceneReport.read(batch.out_dir / record.outputs["report"])
            areas[record.source] = published.areas_m2()
    table = batch_table(records, areas)
    run_id = _run_id()
    create_markdown_artifact(
        markdown=f"# segment-scenes into `{batch.out_dir}`\n\n{table}",
        key="segment-scenes-report",
        description=f"scenes of flow run {run_id}",
    )
    batch.record_run(records, started, seconds, run_id)
    return table


STAGES = ("preflight", "stage", "segment", "publish")  # a scene's chain of tasks, in order


def _failure(batch: Batch, source: Source, chain: list[PrefectFuture[Any]]) -> SceneRecord:
    """The first failed task's exception, as the scene's one line (the driver's wording)."""
    for stage, future in zip(STAGES, chain, strict=False):
        state = future.state
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            if not isinstance(error, BaseException):
                error = RuntimeError(state.message or "crashed")
            return batch.failed(source, stage, error)
    return batch.failed(source, "publish", RuntimeError("did not finish"))


def _run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return None


@flow(
    name="segment-scenes",
    description=__doc__.splitlines()[0] if __doc__ else None,
    # Prefect types TaskRunner as invariant in its future type, so its own runner does not fit its hint
    task_runner=ThreadPoolTaskRunner(max_workers=SCENE_THREADS),  # type: ignore[arg-type]
)
def segment_scenes(
    input: str | list[str],
    output: str,
    model: str,
    options: SegmentOptions | None = None,
) -> dict[str, Any] | State:
    """Segment every scene of ``input`` (a folder, a glob, or a list of paths) into ``output``.

    ``model`` is a checkpoint (.safetensors); ``options`` are the engine's options, as ``deeplab segment``
    takes them. Scenes unchanged since their last successful result are skipped.
    """
    options = options or SegmentOptions()
    started, clock = now_iso(), time.perf_counter()
    info = checkpoint_info(Path(model).resolve())  # a bad checkpoint fails the run at once, naming it
    batch = Batch(Path(output), info, options)
    with batch.hold():  # one writer per output folder: a second run waits here (or is refused, --no-wait)
        return _segment_held(batch, input, options, started, clock)


def _segment_held(
    batch: Batch, input: str | list[str], options: SegmentOptions, started: str, clock: float
) -> dict[str, Any] | State:
    scenes, clashes = discover(batch, input)
    checks: dict[Source, Any] = {source: preflight.submit(batch, source) for source in scenes}
    wait(list(checks.values()))
    to_compute = any(f.state.is_completed() and f.result().previous is None for f in checks.values())
    chains: dict[Source, list[PrefectFuture[Any]]] = {}
    # the cluster starts here, in the flow's main thread (Ray's signal handlers need it), and only when a
    # scene has work: a run that skips every scene never starts one
    with cluster_for(batch.options, batch.out_dir, to_compute, worker_environment()) as cluster:
        for source, checked in checks.items():
            # a task takes its upstream's future in place of its value; Prefect resolves it (or, when the
            # upstream failed, leaves the task NotReady), which the type checker cannot know
            staged: Any = stage.submit(batch, checked, cluster)
            segmented: Any = segment.submit(batch, staged, cluster)
            chains[source] = [checked, staged, segmented, publish.submit(batch, segmented)]
        wait([future for chain in chains.values() for future in chain])
    records = {source: batch.refused(source, line) for source, line in clashes.items()}
    for source, chain in chains.items():
        final = chain[-1]
        records[source] = final.result() if final.state.is_completed() else _failure(batch, source, chain)
    ordered = [records[source] for source in sorted(records, key=str)]
    report(batch, ordered, started, time.perf_counter() - clock)
    failed = [r for r in ordered if r.outcome == "failed"]
    summary = {
        "output": str(batch.out_dir),
        "done": [r.scene_id for r in ordered if r.outcome == "done"],
        "skipped": [r.scene_id for r in ordered if r.outcome == "skipped"],
        "failed": {r.source: r.message for r in failed},
    }
    if failed:
        message = f"{len(failed)} of {len(ordered)} scene(s) failed: " + "; ".join(r.message for r in failed)
        # the other scenes are published; the run still fails so that a nightly batch with a bad scene
        # is noticed (the state's data must be an exception: Prefect raises it for whoever awaits the run)
        return Failed(message=message, data=ScenesFailed(message, summary))
    return summary
