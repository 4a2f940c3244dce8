"""The ``segment-scenes`` flow: discover -> preflight -> stage -> segment on Ray -> publish -> report.

Each scene runs as its own chain of tasks, so a scene that fails fails its own tasks and the others go
on; the flow's final state names every failed scene and why. Scenes overlap in preflight, staging and
publishing; the Ray step of one scene uses the whole cluster, so scenes take turns on it (two scenes'
actors competing for one cluster's CPUs could each hold half of what they need and wait forever).

A scene whose result key (input checksum, checkpoint sha256, config hash) matches its last successful
result, with every output still in place, is skipped: nothing is staged, computed or rewritten.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
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
from flows.discover import discover_scenes, duplicate_ids
from flows.settings import worker_environment
from flows.task_progress import TaskLogProgress
from models.checkpoint import CheckpointInfo, checkpoint_info
from models.errors import DeepLabError
from pipeline.manifest import Manifest, SceneKey, SceneRecord, config_hash, now_iso
from pipeline.ray_engine import KeptActors
from pipeline.segment import (
    PreparedScene,
    SegmentOptions,
    StagedWork,
    as_planned,
    compute_work,
    prepare_scene,
    publish_work,
    stage_work,
    start_actors,
)
from pipeline.sources import Source, source_id

SCENE_THREADS = 4  # scenes in flight at once (preflight, staging and publishing overlap)


class ScenesFailed(DeepLabError):
    """Some scenes of a run failed (the others were published); ``summary`` says which."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class SceneJob:
    """One scene on its way through the tasks."""

    source: Source
    key: SceneKey
    prepared: PreparedScene
    previous: SceneRecord | None = None  # set when the scene is unchanged: it is skipped
    work: StagedWork | None = None

    @property
    def name(self) -> str:
        return self.prepared.name


class SharedRay:
    """The flow run's Ray session (None: the local engine); scenes take turns on it."""

    def __init__(self, ray: Any, options: SegmentOptions, actors: KeptActors | None = None) -> None:
        self.ray = ray
        self.options = options
        self.actors = actors  # kept for the flow run: the scenes share the actors' model loads
        self.lock = threading.Lock()

    def start(self, prepared: PreparedScene) -> None:
        """The scene's actors, started before it is staged, unless another scene holds the session (its
        actors are up already)."""
        if self.actors is None or not self.lock.acquire(blocking=False):
            return
        try:
            start_actors(prepared, self.options, self.actors)
        finally:
            self.lock.release()

    def compute(self, work: StagedWork, progress: TaskLogProgress) -> StagedWork:
        with self.lock:
            return compute_work(work, self.options, self.ray, progress, self.actors)


def _not_ours(task: Any, run: Any, state: State) -> bool:
    """Retry unexpected failures (an actor lost with its node) but never bad input: it fails the same."""
    try:
        state.result()
    except DeepLabError:
        return False
    except Exception:
        return True
    return False


@task(name="discover", cache_policy=NO_CACHE)
def discover(input: str | list[str], output: Path) -> list[Source]:
    scenes = discover_scenes(input, exclude=output)
    get_run_logger().info("%d scene(s) found", len(scenes))
    return scenes


@task(name="preflight", task_run_name="preflight {source}", cache_policy=NO_CACHE)
def preflight(source: Source, checkpoint: CheckpointInfo, options: SegmentOptions, output: Path) -> SceneJob:
    manifest = Manifest(output)
    progress = TaskLogProgress(get_run_logger())
    local_file = isinstance(source, Path) and source.is_file()
    checksum = manifest.checksum(source) if local_file else None  # else prepare_scene reads or refuses it
    prepared = prepare_scene(source, checkpoint, options, checksum, progress)
    key = SceneKey(prepared.checksum, checkpoint.sha256, config_hash(as_planned(options, prepared.plan)))
    previous = manifest.current(str(source), key)
    if previous is not None:
        progress.stage(prepared.name, "unchanged", f"same key as the result of {previous.finished}: skipped")
    return SceneJob(source, key, prepared, previous)


@task(name="stage", task_run_name="stage {job.name}", cache_policy=NO_CACHE)
def stage(job: SceneJob, output: Path, options: SegmentOptions, ray: SharedRay) -> SceneJob:
    if job.previous is None:
        ray.start(job.prepared)  # the actors start while the scene is staged
        job.work = stage_work(job.prepared, output, options, TaskLogProgress(get_run_logger()))
    return job


@task(
    name="segment",
    task_run_name="segment {job.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=_not_ours,
)
def segment(job: SceneJob, ray: SharedRay) -> SceneJob:
    if job.work is not None:
        job.work = ray.compute(job.work, TaskLogProgress(get_run_logger()))
    return job


@task(name="publish", task_run_name="publish {job.name}", cache_policy=NO_CACHE)
def publish(job: SceneJob, output: Path, options: SegmentOptions) -> SceneRecord:
    if job.previous is not None:
        previous = job.previous
        return SceneRecord(
            str(job.source),
            job.name,
            "skipped",
            job.key,
            f"unchanged since {previous.finished}",
            previous.outputs,
            {"computed": 0, "skipped": 0, "resumed": 0},
            0.0,
            now_iso(),
        )
    assert job.work is not None
    result = publish_work(job.work, output, options, TaskLogProgress(get_run_logger()))
    folder = result.mask.parent
    record = SceneRecord(
        str(job.source),
        job.name,
        "done",
        job.key,
        "",
        {name: str((folder / file).relative_to(output)) for name, file in result.details["outputs"].items()},
        result.details["tiles"],
        result.details["seconds"]["total"],
        now_iso(),
    )
    Manifest(output).record_scene(record)
    create_image_artifact(
        image_url=thumbnail_data_url(result.quicklook),
        key=f"quicklook-{artifact_key(job.name)}",
        description=f"{job.source}: the mask over the scene ({result.quicklook})",
    )
    return record


@task(name="report", cache_policy=NO_CACHE)
def report(records: list[SceneRecord], output: Path, run: dict[str, Any]) -> str:
    areas: dict[str, dict[str, float] | None] = {}
    for record in records:
        if record.outputs and "report" in record.outputs:
            details = json.loads((output / record.outputs["report"]).read_text())
            slide_mm2 = details.get("class_areas_mm2")  # slides: no CRS, areas from µm/px
            areas[record.source] = (
                {k: v * 1e-6 for k, v in slide_mm2.items()} if slide_mm2 else details["class_areas_m2"]
            )
    table = batch_table(records, areas)
    create_markdown_artifact(
        markdown=f"# segment-scenes into `{output}`\n\n{table}",
        key="segment-scenes-report",
        description=f"scenes of flow run {run.get('flow_run_id')}",
    )
    Manifest(output).record_run(run, records)
    return table


def _failure(source: Source, chain: list[PrefectFuture[Any]]) -> SceneRecord:
    """The first failed task's exception, as the scene's message (the error names the file)."""
    for future in chain:
        state = future.state
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            message = str(error) if isinstance(error, DeepLabError) else f"{type(error).__name__}: {error}"
            return SceneRecord(str(source), source_id(source), "failed", message=message, finished=now_iso())
    return SceneRecord(str(source), source_id(source), "failed", message="did not finish", finished=now_iso())


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
    out = Path(output).resolve()
    started, clock = now_iso(), time.perf_counter()
    info = checkpoint_info(Path(model).resolve())  # a bad checkpoint fails the run at once, naming it
    scenes = discover(input, out)
    clashes = duplicate_ids(scenes)
    checks: dict[Source, Any] = {
        source: preflight.submit(source, info, options, out) for source in scenes if source not in clashes
    }
    wait(list(checks.values()))
    unchanged = [f.result() for f in checks.values() if f.state.is_completed() and f.result().previous]
    to_compute = sum(f.state.is_completed() for f in checks.values()) - len(unchanged)
    chains: dict[Source, list[PrefectFuture[Any]]] = {}
    with ExitStack() as stack:
        ray = None
        actors = None
        if to_compute and options.engine == "ray":
            # started here, in the flow's main thread (Ray's signal handlers need it), and only when a
            # scene has work: a run that skips every scene never starts a cluster
            from pipeline.ray_engine import kept_actors, ray_session

            work_dir = out / ".work"
            ray = stack.enter_context(
                ray_session(work_dir, options.ray_address, worker_env=worker_environment())
            )
            actors = stack.enter_context(kept_actors(ray, options.keep_warm_s))
        shared = SharedRay(ray, options, actors)
        for source, checked in checks.items():
            # a task takes its upstream's future in place of its value; Prefect resolves it (or, when the
            # upstream failed, leaves the task NotReady), which the type checker cannot know
            staged: Any = stage.submit(checked, out, options, shared)
            segmented: Any = segment.submit(staged, shared)
            chains[source] = [checked, staged, segmented, publish.submit(segmented, out, options)]
        wait([future for chain in chains.values() for future in chain])
    records = []
    for source in scenes:
        if source in clashes:
            records.append(SceneRecord(str(source), source_id(source), "failed", message=clashes[source]))
            continue
        final = chains[source][-1]
        records.append(final.result() if final.state.is_completed() else _failure(source, chains[source]))
    failed = [r for r in records if r.outcome == "failed"]
    run = {
        "flow_run_id": _run_id(),
        "started": started,
        "finished": now_iso(),
        "seconds": round(time.perf_counter() - clock, 3),
        "checkpoint": str(info.path),
        "checkpoint_sha256": info.sha256,
        "config": config_hash(options),
        "outcome": "failed" if failed else "completed",
    }
    report(records, out, run)
    summary = {
        "output": str(out),
        "done": [r.scene_id for r in records if r.outcome == "done"],
        "skipped": [r.scene_id for r in records if r.outcome == "skipped"],
        "failed": {r.source: r.message for r in failed},
    }
    if failed:
        message = f"{len(failed)} of {len(records)} scene(s) failed: " + "; ".join(r.message for r in failed)
        # the other scenes are published; the run still fails so that a nightly batch with a bad scene
        # is noticed (the state's data must be an exception: Prefect raises it for whoever awaits the run)
        return Failed(message=message, data=ScenesFailed(message, summary))
    return summary
