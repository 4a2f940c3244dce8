"""The one batch driver: discover -> preflight every scene -> stage, compute, publish each -> manifest.

`deeplab segment`, its dry run, `deeplab run-flow`, the Prefect deployments and the RayJob / `ray job
submit` entrypoint all run scenes through ``Batch``: the flow only hands it a ``StageRunner`` that runs each
stage as a Prefect task. So they share one sequence and one set of protections:

- folders, globs, lists and GDAL URLs are discovered (``pipeline.io.discover``);
- scenes whose ids cannot name an output folder (``..``, empty) or clash are refused before any work, a
  clash with one line naming all of its scenes;
- a scene whose result key matches its last published result, with every output in place, is skipped;
- every scene is preflighted before the compute backend starts, and a run with nothing to compute starts none;
- any exception while one scene runs becomes that scene's one-line failure naming the file (its traceback
  goes to the scene's log under ``--out/.logs``), and the other scenes go on.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from deeplab_common.errors import UnreadableScene, UnsafeSceneId
from models.checkpoint import CheckpointInfo
from models.runtime import onnx_cache
from pipeline.engine.compute import Compute, compute_for
from pipeline.engine.failures import failure_line, log_failure
from pipeline.engine.grid import cores_to_compute
from pipeline.engine.ledger import Ledger
from pipeline.engine.manifest import Manifest, SceneKey, SceneRecord, config_hash, now_iso
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import WORK_NAME, clean_debris, inside
from pipeline.engine.outputs import output_for
from pipeline.engine.plan import Progress, Silent, as_planned, plan_scene
from pipeline.engine.publish import PublishedScene, publish_scene
from pipeline.engine.run_checks import check_run
from pipeline.engine.scenes import ComputedScene, PlannedScene, StagedScene
from pipeline.engine.space import check_fits
from pipeline.engine.stage import stage_scene
from pipeline.io.discover import Discovered, discover_inputs
from pipeline.io.index_page import write_index_page
from pipeline.io.readers import describe
from pipeline.io.sources import Source, local_file_problem, scene_id_problem, source_id
from pipeline.io.stac import SourceCollection, write_catalog
from pipeline.io.stac_input import StacSearch

CATALOG_TITLE = "deeplab-pipeline outputs"
STAC_FOLDER = "stac"  # under the work folder: a VRT per STAC Item, which the scene is read through
# what a run takes: files, folders, globs, URLs, prefixes, STAC documents, and STAC API searches
Inputs = str | Path | StacSearch | Sequence[str | Path | StacSearch]
# A run's stages, by the one name each has in code, progress lines, failure lines, reports and Prefect tasks.
StageName = Literal["discover", "preflight", "stage", "compute", "publish"]

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class StageRunner:
    """How the driver runs stages: each in turn, in this process, reporting to ``progress``. The flow's runner
    (``flows.stage_tasks``) runs each stage as a Prefect task and scenes side by side; the sequence is the
    driver's either way."""

    run_id: str | None = None  # the orchestrator's id of this run, recorded in the manifest

    def __init__(self, progress: Progress | None = None) -> None:
        self.progress = progress or Silent()

    def stage(self, name: StageName, scene: str, call: Callable[[Progress], Outcome]) -> Outcome:
        """Run one stage of ``scene`` (``call`` raises when the stage fails)."""
        return call(self.progress)

    def each(
        self, call: Callable[[Item], Outcome], items: Sequence[Item], names: Sequence[str]
    ) -> list[Outcome]:
        """``call`` on every item (a scene, named by ``names``; ``call`` never raises), results in order."""
        return [call(item) for item in items]


@dataclass(frozen=True, kw_only=True)
class SceneOutcome:
    """What became of one scene: its manifest record, and its outputs when it was published this run."""

    record: SceneRecord
    published: PublishedScene | None = None


@dataclass
class BatchResult:
    """Every scene's record, in discovery order, and the published results of the scenes done this run."""

    records: list[SceneRecord]
    results: dict[str, PublishedScene] = field(default_factory=dict)  # by source
    run: dict[str, Any] = field(default_factory=dict)  # the run's entry in the manifest

    @property
    def failed(self) -> list[SceneRecord]:
        return [record for record in self.records if record.outcome == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every scene was published or is unchanged, 1 when any failed."""
        return 1 if self.failed else 0


class Batch:
    """One run: its scenes into one output folder, with one checkpoint and one options object. ``run`` is the
    per-scene sequence; the other methods are its stages."""

    def __init__(
        self,
        out: Path | str,
        checkpoint: CheckpointInfo,
        options: SegmentOptions,
        progress: Progress | None = None,
    ) -> None:
        self.output = output_for(out, options.scratch)  # a local folder, or a bucket built in scratch
        self.out_dir = self.output.folder  # where the run writes its files
        self.work_dir = self.out_dir / WORK_NAME  # staging, ledgers, ONNX exports, the run's Ray temp dir
        self.checkpoint = checkpoint
        self.options = _for_output_folder(options, self.work_dir)
        self.progress = progress or Silent()
        self.manifest = Manifest(self.out_dir, self.output.exists)
        self.options_hash = config_hash(self.options)  # the options as given: a record's, and the run's
        self.collection: SourceCollection | None = None  # the STAC Collection the inputs came from

    @contextmanager
    def hold(self) -> Iterator[Batch]:
        """The run's hold on its output folder: waits for (or, with ``--no-wait``, refuses) another run
        writing there, then removes what dead runs left behind. Stages run inside it."""
        folder = self._folder_name
        with self.output.hold(self.options.wait, lambda line: self.progress.stage(folder, "waiting", line)):
            removed = clean_debris(self.out_dir)
            if removed:
                self.progress.stage(folder, "cleaned", f"{len(removed)} leftover(s) of an interrupted run")
            try:
                yield self
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this run's partial outputs go now, not next run
                removed = clean_debris(self.out_dir)
                self.progress.stage(folder, "stopped", f"{len(removed)} partial output(s) removed")
                raise

    def run(
        self,
        inputs: Inputs,
        runner: StageRunner | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> BatchResult:
        """Every scene of ``inputs``, each through its stages on one compute backend, holding the folder."""
        runner = runner or StageRunner(self.progress)
        started, clock = now_iso(), time.perf_counter()
        with self.hold():
            inputs_found = runner.stage("discover", self._folder_name, lambda _: self.discover(inputs))
            found, refused = inputs_found.scenes, inputs_found.refused
            self.collection = self.manifest.source_collection(inputs_found.collection)
            records = {source: self.refused(source, line) for source, line in refused.items()}
            planned: list[PlannedScene] = []
            for source, checked in zip(
                found,
                runner.each(lambda s: self._checked(s, runner), found, [source_id(s) for s in found]),
                strict=True,
            ):
                if isinstance(checked, SceneRecord):
                    records[source] = checked
                else:
                    planned.append(checked)
            with compute_for(
                self.options, self.work_dir, bool(planned), worker_env, self.output.shared_work_dir
            ) as compute:
                outcomes = runner.each(
                    lambda scene: self.run_scene(scene, compute, runner), planned, [p.name for p in planned]
                )
            results = {}
            for scene, outcome in zip(planned, outcomes, strict=True):
                records[scene.source] = outcome.record
                if outcome.published is not None:
                    results[str(scene.source)] = outcome.published
            ordered = [records[source] for source in sorted(records, key=str)]
            run = self.record_run(ordered, started, time.perf_counter() - clock, runner.run_id)
        return BatchResult(ordered, results, run)

    def plan(self, inputs: Inputs) -> list[PlannedScene | SceneRecord]:
        """The dry run: every scene of ``inputs`` discovered and preflighted as ``run`` would, writing nothing
        (input identities are taken from the manifest's cache, or computed and not kept; STAC Items' VRTs go
        to a temporary folder). Refused scenes come back as their failed records."""
        with tempfile.TemporaryDirectory(prefix="deeplab-plan-") as stac_folder:
            return self._plan(inputs, Path(stac_folder))

    def _plan(self, inputs: Inputs, stac_folder: Path) -> list[PlannedScene | SceneRecord]:
        self.output.look()  # a bucket's manifest and listing: what a run would skip
        found = self.discover(inputs, stac_folder)
        runner = StageRunner(self.progress)
        checked = [self._checked(source, runner, dry_run=True) for source in found.scenes]
        return [self.refused(source, line) for source, line in found.refused.items()] + checked

    def run_scene(self, planned: PlannedScene, compute: Compute, runner: StageRunner) -> SceneOutcome:
        """One planned scene through stage -> compute -> publish; any failure is the scene's record."""
        stage: StageName = "stage"
        try:
            staged = runner.stage(
                "stage", planned.name, lambda progress: self.stage(planned, compute, progress)
            )
            stage = "compute"
            computed = runner.stage(
                "compute", planned.name, lambda progress: compute.compute(staged, progress)
            )
            stage = "publish"
            return runner.stage("publish", planned.name, lambda progress: self.publish(computed, progress))
        except Exception as error:
            return SceneOutcome(record=self.failed(planned.source, stage, error))

    def discover(self, inputs: Inputs, stac_folder: Path | None = None) -> Discovered:
        """The scenes to run, and those refused before any work (unsafe or clashing ids, STAC Items without
        the model's bands) with their line. STAC Items become VRTs in ``stac_folder`` (the work folder's)."""
        entries = [inputs] if isinstance(inputs, str | Path | StacSearch) else list(inputs)
        bands = [band.name for band in self.checkpoint.metadata.bands]
        folder = stac_folder or self.work_dir / STAC_FOLDER
        return discover_inputs(
            entries, self.out_dir, bands, self.options.assets, folder, self.options.allow_remote_sources
        )

    def preflight(
        self, source: Source, progress: Progress, keep_identity: bool = True
    ) -> PlannedScene | SceneRecord:
        """Check the scene against the checkpoint (raises on problems), plan it on the free space of the
        output folder, key it, and find whether it is unchanged since its last published result.

        A scene whose identity, checkpoint and options are those of its published result is skipped before
        it is even opened (its skipped record comes back): a nightly run over unchanged remote scenes costs
        one HEAD request each."""
        clock = time.perf_counter()
        if problem := scene_id_problem(source):  # refused in discovery already; here for direct callers
            raise UnsafeSceneId(f"{source}: {problem}")
        if isinstance(source, Path) and (problem := local_file_problem(source)):
            raise UnreadableScene(f"{source}: {problem}")
        if not self.options.replace:
            self.manifest.check_owner(str(source), source_id(source), self.checkpoint.sha256)
        identity = self.manifest.input_identity(source, keep=keep_identity, verify=self.options.verify_inputs)
        if (
            previous := self.manifest.unchanged(
                str(source), identity, self.checkpoint.sha256, self.options_hash
            )
        ) is not None:
            return self.skipped(source, previous, progress)
        scene = describe(source, self.options.mpp)
        plan = plan_scene(scene, self.checkpoint.metadata, self.options, self.out_dir)
        progress.stage(scene.scene_id, "preflight", "; ".join(plan.check.warnings))
        key = SceneKey(
            input_identity=identity,
            checkpoint_sha256=self.checkpoint.sha256,
            config=config_hash(as_planned(self.options, plan)),
        )
        if (previous := self.manifest.current(str(source), key)) is not None:
            return self.skipped(source, previous, progress)
        return PlannedScene(
            source=source,
            scene=scene,
            checkpoint=self.checkpoint,
            plan=plan,
            input_identity=identity,
            key=key,
            seconds=time.perf_counter() - clock,
        )

    def stage(self, planned: PlannedScene, compute: Compute, progress: Progress) -> StagedScene:
        """Stage the scene into zarr under ``OUT/.work`` (the backend starts its workers meanwhile) and list
        the cores its ledger still lacks."""
        compute.warm(planned)
        clock = time.perf_counter()
        plan, scene = planned.plan, planned.scene
        # again: the scenes staged since the preflight took their share of the disk
        check_fits(
            planned.source, plan.shape, scene.bands, scene.dtype, self.out_dir, self.options.probabilities
        )
        # a symlinked work folder must not carry writes away
        inside(self.out_dir, self.work_dir / planned.name)
        progress.stage(planned.name, "stage")
        stores = stage_scene(scene, self.work_dir, plan.tiling.tile, planned.input_identity, plan.check.scale)
        ledger = Ledger(
            stores.folder,
            planned.ledger_key,
            plan.shape,
            plan.tiling.tile,
            confidence=self.options.probabilities,
        )
        todo, nodata_cores = cores_to_compute(plan.tiles, stores.valid(), ledger.is_done)
        return StagedScene(
            planned=planned,
            stores=stores,
            ledger=ledger,
            todo=todo,
            nodata_cores=nodata_cores,
            resumed=ledger.done_count,
            seconds=time.perf_counter() - clock,
        )

    def publish(self, computed: ComputedScene, progress: Progress) -> SceneOutcome:
        """Publish a computed scene and record it in the manifest."""
        published = publish_scene(computed, self.out_dir, self.options, progress)
        report, planned = published.report, computed.staged.planned
        outputs = {name: str(Path(planned.name) / file) for name, file in report.outputs.items()}
        record = SceneRecord(
            source=str(planned.source),
            scene_id=planned.name,
            outcome="done",
            key=planned.key,
            options=self.options_hash,
            outputs=outputs,
            tiles=report.tiles.model_dump(),
            seconds=report.total_seconds,
            finished=now_iso(),
        )
        self.manifest.record_scene(record)
        write_catalog(self.out_dir, CATALOG_TITLE, self._folder_name, self.collection)
        self.output.scene_published(planned.name, list(outputs.values()))
        return SceneOutcome(record=record, published=published)

    def skipped(self, source: Source, previous: SceneRecord, progress: Progress) -> SceneRecord:
        """An unchanged scene keeps its outputs, under its last record's."""
        progress.stage(
            source_id(source), "unchanged", f"same key as the result of {previous.finished}: skipped"
        )
        return replace(
            previous,
            outcome="skipped",
            message=f"unchanged since {previous.finished}",
            tiles={"computed": 0, "skipped": 0, "resumed": 0},
            seconds=0.0,
            finished=now_iso(),
        )

    def failed(
        self, source: Source, stage: StageName, error: BaseException, keep_log: bool = True
    ) -> SceneRecord:
        """A scene that broke while it ran: its record, with its one line; the traceback goes to its log
        (unless ``keep_log`` is False: a dry run writes nothing)."""
        line = failure_line(source, stage, error)
        logged = log_failure(self.out_dir, source, stage, error) if keep_log else None
        return self.refused(source, line if logged is None else f"{line} (details: {logged})")

    def refused(self, source: Source, line: str) -> SceneRecord:
        """A scene that did not run (or broke), with the line that says why."""
        return SceneRecord(
            source=str(source), scene_id=source_id(source), outcome="failed", message=line, finished=now_iso()
        )

    def record_run(
        self, records: list[SceneRecord], started: str, seconds: float, run_id: str | None = None
    ) -> dict[str, Any]:
        """The run's entry in the manifest (every scene's outcome), returned as recorded; then the folder's
        STAC catalog and index.html, over every scene published in it (the page reads every scene's report,
        so it is written once a run, not after each scene)."""
        failed = any(record.outcome == "failed" for record in records)
        run = {
            "flow_run_id": run_id,
            "started": started,
            "finished": now_iso(),
            "seconds": round(seconds, 3),
            "checkpoint": str(self.checkpoint.path),
            "checkpoint_sha256": self.checkpoint.sha256,
            "config": self.options_hash,
            "outcome": "failed" if failed else "completed",
        }
        self.manifest.record_run(run, records)
        self.output.before_pages()
        write_catalog(self.out_dir, CATALOG_TITLE, self._folder_name, self.collection)
        write_index_page(self.out_dir, CATALOG_TITLE)
        self.output.run_recorded()
        return run

    @property
    def _folder_name(self) -> str:
        return Path(self.output.location).name or self.output.location

    def _checked(
        self, source: Source, runner: StageRunner, dry_run: bool = False
    ) -> PlannedScene | SceneRecord:
        """The scene's preflight as a stage; a refusal is its failed record."""
        try:
            return runner.stage(
                "preflight", source_id(source), lambda progress: self.preflight(source, progress, not dry_run)
            )
        except Exception as error:
            return self.failed(source, "preflight", error, keep_log=not dry_run)


def run_batch(
    inputs: Inputs,
    model: Path | CheckpointInfo,
    out_dir: Path | str,
    options: SegmentOptions,
    progress: Progress | None = None,
    worker_env: dict[str, str] | None = None,
) -> BatchResult:
    """Every scene of ``inputs`` into ``out_dir``, one after another on one compute backend.

    A bad checkpoint or an input that names nothing raises (a usage error: nothing can run); anything that
    goes wrong with one scene is that scene's failure, and the others go on."""
    entries = [inputs] if isinstance(inputs, str | Path | StacSearch) else list(inputs)
    info = check_run(entries, model, out_dir, options)
    return Batch(out_dir, info, options, progress).run(entries, worker_env=worker_env)


def _for_output_folder(options: SegmentOptions, work_dir: Path) -> SegmentOptions:
    """``options`` with what depends on the run's output folder filled in: where ONNX exports are kept."""
    if options.onnx_cache is not None:
        return options
    return options.model_copy(update={"onnx_cache": str(onnx_cache(work_dir))})
