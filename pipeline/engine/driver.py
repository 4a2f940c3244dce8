"""The one batch driver: discover -> preflight every scene -> stage, compute, publish each -> manifest.

`deeplab segment`, `deeplab run-flow`, the Prefect deployments (whose tasks call the stages of ``Batch``)
and the RayJob / `ray job submit` entrypoint all run scenes through here, so they share one set of
protections:

- folders, globs, lists and GDAL URLs are discovered (``pipeline.io.discover``);
- scenes whose ids cannot name an output folder (``..``, empty) or clash are refused before any work, a
  clash with one line naming all of its scenes;
- a scene whose result key matches its last published result, with every output in place, is skipped;
- every scene is preflighted before a cluster starts, and a run with nothing to compute starts none;
- any exception while one scene runs becomes that scene's one-line failure naming the file (its traceback
  goes to the scene's log under ``--out/.logs``), and the other scenes go on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.checkpoint import CheckpointInfo, checkpoint_info
from pipeline.engine.failures import failure_line, log_failure
from pipeline.engine.manifest import Manifest, Outcome, SceneKey, SceneRecord, config_hash, now_iso
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import clean_debris, output_folder, output_lock
from pipeline.engine.plan import Progress, Silent, as_planned
from pipeline.engine.publish import SegmentResult, publish_work
from pipeline.engine.segment import compute_work, for_output_folder, prepare_scene, stage_work, start_actors
from pipeline.engine.work import PreparedScene, StagedWork
from pipeline.io.discover import discover_scenes, refused_scenes
from pipeline.io.index_page import write_index_page
from pipeline.io.sources import Source, source_id
from pipeline.io.stac import write_catalog
from pipeline.ray.session import KeptActors, kept_actors, ray_session

CATALOG_TITLE = "deeplab-pipeline outputs"
Stage = Literal["discover", "preflight", "stage", "segment", "publish"]


@dataclass
class SceneJob:
    """One scene on its way through the stages."""

    source: Source
    key: SceneKey
    prepared: PreparedScene
    previous: SceneRecord | None = None  # set when the scene is unchanged: it is skipped
    work: StagedWork | None = None

    @property
    def name(self) -> str:
        return self.prepared.name

    def record(
        self,
        outcome: Outcome,
        message: str,
        outputs: dict[str, str] | None,
        tiles: dict[str, int],
        seconds: float,
    ) -> SceneRecord:
        """The scene's record in the manifest, under its key."""
        return SceneRecord(
            str(self.source), self.name, outcome, self.key, message, outputs, tiles, seconds, now_iso()
        )


class Cluster:
    """Where a run computes: a Ray session with the run's kept actors, or this process (``ray`` None).
    Scenes take turns on it: two scenes' actors competing for one cluster's CPUs could each hold half of
    what they need and wait forever."""

    def __init__(self, ray: Any, options: SegmentOptions, actors: KeptActors | None = None) -> None:
        self.ray = ray
        self.options = options
        self.actors = actors  # kept for the whole run: its scenes share the actors' model loads
        self.lock = threading.Lock()

    def start(self, prepared: PreparedScene) -> None:
        """The scene's actors, started before it is staged so that their start overlaps the staging, unless
        another scene holds the session (its actors are up already)."""
        if self.actors is None or not self.lock.acquire(blocking=False):
            return
        try:
            start_actors(prepared, self.options, self.actors)
        finally:
            self.lock.release()

    def compute(self, work: StagedWork, progress: Progress) -> StagedWork:
        with self.lock:
            return compute_work(work, self.options, self.ray, progress, self.actors)


@contextmanager
def cluster_for(
    options: SegmentOptions, out_dir: Path, needed: bool, worker_env: dict[str, str] | None = None
) -> Iterator[Cluster]:
    """The run's cluster: Ray (started, or joined at ``ray_address``) only when a scene has work and the
    engine is Ray; a run that skips every scene never starts one. Call it from the main thread: Ray's
    signal handlers need it."""
    with ExitStack() as stack:
        if not needed or options.engine == "local":
            yield Cluster(None, options)
            return
        ray = stack.enter_context(
            ray_session(Path(out_dir) / ".work", options.ray_address, worker_env=worker_env)
        )
        actors = stack.enter_context(kept_actors(ray, options.keep_warm_s))
        yield Cluster(ray, options, actors)


class Batch:
    """One run: its scenes into one output folder, with one checkpoint and one options object.

    The methods are the run's stages; ``run_batch`` calls them in turn, the ``segment-scenes`` flow calls
    each from its own Prefect task."""

    def __init__(
        self,
        out_dir: Path,
        checkpoint: CheckpointInfo,
        options: SegmentOptions,
        progress: Progress | None = None,
    ) -> None:
        self.out_dir = output_folder(out_dir)  # a file named as --out is a usage error, said at once
        self.checkpoint = checkpoint
        self.options = for_output_folder(options, self.out_dir)
        self.progress = progress or Silent()
        self.manifest = Manifest(self.out_dir)

    @contextmanager
    def hold(self) -> Iterator[Batch]:
        """The run's hold on its output folder: waits for (or, with ``--no-wait``, refuses) another run
        writing there, then removes what dead runs left behind. Stages run inside it."""
        folder = self.out_dir.name or str(self.out_dir)
        with output_lock(
            self.out_dir, self.options.wait, lambda line: self.progress.stage(folder, "waiting", line)
        ):
            removed = clean_debris(self.out_dir)
            if removed:
                self.progress.stage(folder, "cleaned", f"{len(removed)} leftover(s) of an interrupted run")
            yield self

    def discover(self, inputs: str | Path | Sequence[str | Path]) -> tuple[list[Source], dict[Source, str]]:
        """The scenes to run, and those refused before any work (unsafe or clashing ids) with their line."""
        entries = [inputs] if isinstance(inputs, str | Path) else list(inputs)
        scenes = discover_scenes([str(entry) for entry in entries], exclude=self.out_dir)
        refused = refused_scenes(scenes)
        return [scene for scene in scenes if scene not in refused], refused

    def preflight(self, source: Source, progress: Progress | None = None) -> SceneJob:
        """Check the scene against the checkpoint (raises on problems), plan it, and decide whether it is
        unchanged since its last published result."""
        progress = progress or self.progress
        local_file = isinstance(source, Path) and source.is_file()
        checksum = self.manifest.checksum(source) if local_file else None  # else prepare_scene reads it
        prepared = prepare_scene(source, self.checkpoint, self.options, checksum, progress, self.out_dir)
        key = SceneKey(
            prepared.checksum, self.checkpoint.sha256, config_hash(as_planned(self.options, prepared.plan))
        )
        previous = self.manifest.current(str(source), key)
        if previous is not None:
            progress.stage(
                prepared.name, "unchanged", f"same key as the result of {previous.finished}: skipped"
            )
        return SceneJob(source, key, prepared, previous)

    def stage(self, job: SceneJob, cluster: Cluster, progress: Progress | None = None) -> SceneJob:
        if job.previous is None:
            cluster.start(job.prepared)  # the actors start while the scene is staged
            job.work = stage_work(job.prepared, self.out_dir, self.options, progress or self.progress)
        return job

    def compute(self, job: SceneJob, cluster: Cluster, progress: Progress | None = None) -> SceneJob:
        if job.work is not None:
            job.work = cluster.compute(job.work, progress or self.progress)
        return job

    def publish(
        self, job: SceneJob, progress: Progress | None = None
    ) -> tuple[SceneRecord, SegmentResult | None]:
        """Publish a computed scene and record it in the manifest; an unchanged one keeps its outputs."""
        if job.previous is not None:
            previous = job.previous
            unchanged = f"unchanged since {previous.finished}"
            no_work = {"computed": 0, "skipped": 0, "resumed": 0}
            return job.record("skipped", unchanged, previous.outputs, no_work, 0.0), None
        assert job.work is not None, "publish follows stage and compute"
        result = publish_work(job.work, self.out_dir, self.options, progress or self.progress)
        folder = result.mask.parent.relative_to(self.out_dir)
        published = result.details
        outputs = {name: str(folder / file) for name, file in published.outputs.items()}
        record = job.record("done", "", outputs, published.tiles.model_dump(), published.total_seconds)
        self.manifest.record_scene(record)
        write_catalog(self.out_dir, CATALOG_TITLE)  # links only: a glob of the folder, no file read
        return record, result

    def write_indexes(self) -> None:
        """The folder's STAC catalog and index.html, over every scene published in it (rewritten whole). The
        page reads every scene's report, so it is written once a run, not after each scene."""
        write_catalog(self.out_dir, CATALOG_TITLE)
        write_index_page(self.out_dir, CATALOG_TITLE)

    def failed(self, source: Source, stage: str, error: BaseException) -> SceneRecord:
        """A scene that broke while it ran: its record, with its one line; the traceback goes to its log."""
        line = failure_line(source, stage, error)
        log = log_failure(self.out_dir, source, stage, error)
        return self.refused(source, line if log is None else f"{line} (details: {log})")

    def refused(self, source: Source, line: str) -> SceneRecord:
        """A scene that did not run (or broke), with the line that says why."""
        return SceneRecord(str(source), source_id(source), "failed", message=line, finished=now_iso())

    def record_run(
        self, records: list[SceneRecord], started: str, seconds: float, run_id: str | None = None
    ) -> dict[str, Any]:
        """The run's entry in the manifest (every scene's outcome), returned as recorded."""
        failed = any(record.outcome == "failed" for record in records)
        run = {
            "flow_run_id": run_id,
            "started": started,
            "finished": now_iso(),
            "seconds": round(seconds, 3),
            "checkpoint": str(self.checkpoint.path),
            "checkpoint_sha256": self.checkpoint.sha256,
            "config": config_hash(self.options),
            "outcome": "failed" if failed else "completed",
        }
        self.manifest.record_run(run, records)
        self.write_indexes()  # also over folders published before the catalog and page existed
        return run


@dataclass
class BatchResult:
    """Every scene's record, in discovery order, and the published results of the scenes done this run."""

    records: list[SceneRecord]
    results: dict[str, SegmentResult] = field(default_factory=dict)  # by source

    @property
    def failed(self) -> list[SceneRecord]:
        return [record for record in self.records if record.outcome == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every scene was published or is unchanged, 1 when any failed."""
        return 1 if self.failed else 0


def run_batch(
    inputs: str | Path | Sequence[str | Path],
    model: Path | CheckpointInfo,
    out_dir: Path,
    options: SegmentOptions,
    progress: Progress | None = None,
    worker_env: dict[str, str] | None = None,
) -> BatchResult:
    """Every scene of ``inputs`` into ``out_dir``, one after another on one cluster.

    A bad checkpoint or an input that names nothing raises (a usage error: nothing can run); anything that
    goes wrong with one scene is that scene's failure, and the others go on."""
    started, clock = now_iso(), time.perf_counter()
    info = model if isinstance(model, CheckpointInfo) else checkpoint_info(Path(model).resolve())
    batch = Batch(out_dir, info, options, progress)
    with batch.hold():
        return _run_held(batch, inputs, options, started, clock, worker_env)


def _run_held(
    batch: Batch,
    inputs: str | Path | Sequence[str | Path],
    options: SegmentOptions,
    started: str,
    clock: float,
    worker_env: dict[str, str] | None,
) -> BatchResult:
    scenes, clashes = batch.discover(inputs)
    records = {source: batch.refused(source, line) for source, line in clashes.items()}
    jobs: list[SceneJob] = []
    for source in scenes:  # every scene is checked before a cluster starts
        try:
            jobs.append(batch.preflight(source))
        except Exception as error:
            records[source] = batch.failed(source, "preflight", error)
    results: dict[str, SegmentResult] = {}
    to_compute = any(job.previous is None for job in jobs)
    with cluster_for(batch.options, batch.out_dir, to_compute, worker_env) as cluster:
        for job in jobs:
            stage: Stage = "stage"
            try:
                batch.stage(job, cluster)
                stage = "segment"
                batch.compute(job, cluster)
                stage = "publish"
                record, result = batch.publish(job)
            except Exception as error:
                records[job.source] = batch.failed(job.source, stage, error)
                continue
            records[job.source] = record
            if result is not None:
                results[str(job.source)] = result
    ordered = [records[source] for source in sorted(records, key=str)]
    batch.record_run(ordered, started, time.perf_counter() - clock)
    return BatchResult(ordered, results)
