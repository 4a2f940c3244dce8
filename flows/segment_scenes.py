"""The ``segment-scenes`` flow: the batch driver (``pipeline.engine.driver``) with each stage a Prefect task.

discover -> preflight (every scene) -> stage -> compute -> publish (each scene). Each scene runs as its own
chain of tasks (``flows.stage_tasks``), so a scene that fails fails its own tasks and the others go on; the
flow's final state names every failed scene and why. Scenes overlap in preflight, staging and publishing;
the compute step of one scene uses the whole backend, so scenes take turns on it.

What a stage does, and which scenes are refused or skipped (an id clash; a result key unchanged since the
last published result, with every output in place), is the driver's: `deeplab segment` runs the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from deeplab_common.errors import ConfigError, DeepLabError
from flows.artifacts import artifact_key, batch_table, thumbnail_data_url
from flows.settings import worker_environment
from flows.stage_tasks import TaskStages
from pipeline.engine.driver import Batch, BatchResult
from pipeline.engine.options import SegmentOptions
from pipeline.engine.run_checks import check_run
from pipeline.io.report import SceneReport
from pipeline.io.sources import as_source
from pipeline.io.stac_input import StacSearch

SCENE_THREADS = 4  # scenes in flight at once (preflight, staging and publishing overlap)


class ScenesFailed(DeepLabError):
    """Some scenes of a run failed (the others were published); ``summary`` says which."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@flow(
    name="segment-scenes",
    description=__doc__.splitlines()[0] if __doc__ else None,
    # Prefect types TaskRunner as invariant in its future type, so its own runner does not fit its hint
    task_runner=ThreadPoolTaskRunner(max_workers=SCENE_THREADS),  # type: ignore[arg-type]
)
def segment_scenes(
    input: str | list[str] | None,
    output: str,
    model: str,
    options: SegmentOptions | None = None,
    search: StacSearch | None = None,
) -> dict[str, Any] | State:
    """Segment every scene of ``input`` (folders, globs, files, URLs, bucket prefixes, STAC files) and of
    ``search`` (a STAC API search) into ``output`` (a folder or a bucket prefix).

    ``model`` is a checkpoint (.safetensors); ``options`` are the engine's options, as ``deeplab segment``
    takes them. Scenes unchanged since their last successful result are skipped. A nightly deployment
    searches a window back from its run (``search.datetime`` ``P1D``: the last day's Items).
    """
    entries: list[str | StacSearch] = [input] if isinstance(input, str) else list(input or [])
    if not entries and search is None:
        raise ConfigError("segment-scenes: no input: give input (scenes) or search (a STAC API search)")
    options = options or SegmentOptions()
    # a bad checkpoint, --out or input fails the run at once, naming it
    info = check_run(entries, Path(model), as_source(output), options)
    batch = Batch(as_source(output), info, options)
    # one writer per output folder: a second run waits (or is refused, --no-wait); the compute backend starts
    # in this, the flow's main thread (Ray's signal handlers need it), and only when a scene has work
    result = batch.run(entries + ([search] if search else []), TaskStages(), worker_environment())
    _artifacts(batch, result)
    summary = {
        "output": batch.output.location,
        "done": [r.scene_id for r in result.records if r.outcome == "done"],
        "skipped": [r.scene_id for r in result.records if r.outcome == "skipped"],
        "failed": {r.source: r.message for r in result.failed},
    }
    if result.failed:
        lines = "; ".join(r.message for r in result.failed)
        message = f"{len(result.failed)} of {len(result.records)} scene(s) failed: {lines}"
        # the other scenes are published; the run still fails so that a nightly batch with a bad scene
        # is noticed (the state's data must be an exception: Prefect raises it for whoever awaits the run)
        return Failed(message=message, data=ScenesFailed(message, summary))
    return summary


def _artifacts(batch: Batch, result: BatchResult) -> None:
    """The run's table of scenes (class areas of skipped ones too, from their reports), and each scene
    published this run's quicklook, on the flow run."""
    areas = {
        record.source: SceneReport.read(batch.output.local(record.outputs["report"])).areas_m2()
        for record in result.records
        if record.outputs and "report" in record.outputs
    }
    table = batch_table(result.records, areas)
    create_markdown_artifact(
        markdown=f"# segment-scenes into `{batch.output.location}`\n\n{table}",
        key="segment-scenes-report",
        description=f"scenes of flow run {result.run.get('flow_run_id')}",
    )
    for published in result.results.values():
        create_image_artifact(
            image_url=thumbnail_data_url(published.quicklook),
            key=f"quicklook-{artifact_key(published.folder.name)}",
            description=f"{published.source}: the mask over the scene ({published.quicklook})",
        )
