"""A scene's stages: prepare (preflight, plan, checksum) -> stage into zarr -> compute every core still to
do -> publish (``pipeline.engine.publish``).

The cores are computed on Ray actors or, with the local engine, by the same workers in this process. The Ray
modules are imported with this one, before any cluster starts: a job's driver must not import from its
working directory while nodes that share it on one host unpack it again for their actors. Each
finished core is written into ``labels.zarr`` and recorded in the scene's ledger; running again computes only
the missing cores, and the published mask is identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic import write_text_atomically
from models.checkpoint import CheckpointInfo, checkpoint_info
from models.errors import DataError
from models.metadata import CheckpointMetadata
from models.runtime import onnx_cache
from pipeline.crf import CPU_DEFAULT
from pipeline.engine.grid import PLAN_VERSION, Tile, fit_blocks, has_image_pooling
from pipeline.engine.ledger import Ledger, result_key
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import WORK_NAME, inside
from pipeline.engine.plan import Progress, Silent, plan_scene
from pipeline.engine.publish import SegmentResult, publish_work
from pipeline.engine.space import check_space
from pipeline.engine.stage import stage_scene
from pipeline.engine.work import PreparedScene, StagedWork
from pipeline.engine.workers import (
    CoreDone,
    CRFWorker,
    ModelWorker,
    Work,
    WorkSpec,
    context_of,
    local_context_sums,
    read_windows,
    tiles_of,
    window_batches,
    write_core,
)
from pipeline.io.readers import describe
from pipeline.io.sources import Source, scene_id_problem, source_sha256
from pipeline.ray.scheduler import run_tiles, scene_context_sums
from pipeline.ray.session import KeptActors, RunStats, actor_pools
from pipeline.ray.storage import StorageCheck


def prepare_scene(
    scene_path: Source,
    checkpoint: Path | CheckpointInfo,
    options: SegmentOptions,
    checksum: str | None = None,
    progress: Progress | None = None,
    out_dir: Path | None = None,
) -> PreparedScene:
    """Preflight (raises on problems), the tile plan and the input's checksum (computed unless given); with
    ``out_dir``, the scene must fit the free space there."""
    clock = time.perf_counter()
    # the weights are loaded where the model runs (actors or _compute), never here
    if problem := scene_id_problem(scene_path):  # the driver refuses these before any work; callers of the
        raise DataError(f"{scene_path}: {problem}")  # stages themselves are refused here
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else checkpoint_info(checkpoint)
    scene = describe(scene_path, options.mpp)
    plan = plan_scene(scene, info.metadata, options, out_dir)
    (progress or Silent()).stage(scene.scene_id, "preflight", "; ".join(plan.check.warnings))
    checksum = checksum or source_sha256(scene.path)
    prepared = PreparedScene(scene.path, scene, info, plan, checksum)
    prepared.timings["preflight"] = time.perf_counter() - clock
    return prepared


def stage_work(
    prepared: PreparedScene, out_dir: Path, options: SegmentOptions, progress: Progress | None = None
) -> StagedWork:
    """Stage the scene into zarr under ``out_dir/.work`` and list the cores a run still has to compute."""
    progress = progress or Silent()
    clock = time.perf_counter()
    plan, name = prepared.plan, prepared.name
    check_space(prepared, Path(out_dir), options.probabilities)  # again: earlier scenes took their share
    inside(out_dir, Path(out_dir) / WORK_NAME / name)  # a symlinked work folder must not carry writes away
    progress.stage(name, "stage")
    staged = stage_scene(
        prepared.scene, Path(out_dir) / WORK_NAME, plan.tiling.tile, prepared.checksum, plan.check.scale
    )
    prepared.timings["stage"] = time.perf_counter() - clock
    key = result_key(
        input=prepared.checksum,
        checkpoint=prepared.checkpoint.sha256,
        tile=plan.tiling.tile,
        halo=plan.halo,
        cores_per_window=plan.tiling.cores_per_window,
        crf=plan.crf_key(),
        scales=plan.multiscale.scales,
        fuse=plan.multiscale.fuse,
        tta=plan.tta,
        scale=plan.check.scale,
        plan=PLAN_VERSION,
        context=scene_context_used(options, prepared.checkpoint.metadata),
    )
    ledger = Ledger(staged.folder, key, plan.shape, plan.tiling.tile, confidence=options.probabilities)
    todo, skipped = cores_to_compute(plan.tiles, staged.valid(), ledger.is_done)
    return StagedWork(prepared, staged, ledger, todo, skipped, ledger.done_count)


def scene_context_used(options: SegmentOptions, metadata: CheckpointMetadata) -> bool:
    """``--context scene`` changes anything only for a model with image pooling."""
    return options.context == "scene" and has_image_pooling(metadata)


def cores_to_compute(
    tiles: list[Tile], valid_store: Any, is_done: Callable[[int, int], bool] | None = None
) -> tuple[list[Work], int]:
    """The cores still to compute (with a valid mask where partly nodata), and how many are wholly nodata.
    Blocks of cores are fitted to the cores with valid pixels (``fit_blocks``).

    Without ``is_done``: every core with a valid pixel."""
    cores: list[Tile] = []
    masks: list[np.ndarray | None] = []
    for tile in tiles:
        core_valid = np.asarray(
            valid_store[
                tile.core_top : tile.core_top + tile.core_height,
                tile.core_left : tile.core_left + tile.core_width,
            ]
        )
        if core_valid.any():  # else left nodata, never computed
            cores.append(tile)
            masks.append(None if core_valid.all() else core_valid)
    todo = [
        (tile, mask)
        for tile, mask in zip(fit_blocks(cores), masks, strict=True)
        if is_done is None or not is_done(tile.row, tile.col)
    ]
    return todo, len(tiles) - len(cores)


def for_output_folder(options: SegmentOptions, out_dir: Path) -> SegmentOptions:
    """``options`` with what depends on the run's output folder filled in: where ONNX exports are kept."""
    if options.onnx_cache is not None:
        return options
    return options.model_copy(update={"onnx_cache": str(onnx_cache(Path(out_dir) / WORK_NAME))})


def work_spec(prepared: PreparedScene, options: SegmentOptions) -> WorkSpec:
    """What each window of the scene goes through (before any scene context)."""
    scene_context = scene_context_used(options, prepared.checkpoint.metadata)
    return WorkSpec(
        crf=prepared.plan.crf,
        crf_backend=prepared.plan.crf_backend or CPU_DEFAULT,
        crf_device=options.crf_device,
        input_max=prepared.checkpoint.metadata.input_max,
        scales=prepared.plan.multiscale.scales,
        fuse=prepared.plan.multiscale.fuse,
        tta=prepared.plan.tta,
        batch_size=options.batch_size,
        device=options.device,
        amp=options.amp,
        runtime="eager" if scene_context else options.runtime,  # the context is a hook on torch's module
        onnx_cache=options.onnx_cache,
        probabilities=options.probabilities,
    )


def start_actors(prepared: PreparedScene, options: SegmentOptions, actors: KeptActors) -> None:
    """The scene's actors, started before it is staged so that their start overlaps the staging."""
    checkpoint = prepared.checkpoint
    spec = work_spec(prepared, options)
    actors.start(checkpoint.path, checkpoint.sha256, spec, options.gpus_per_model_actor)


def compute_work(
    work: StagedWork,
    options: SegmentOptions,
    ray: Any = None,
    progress: Progress | None = None,
    actors: KeptActors | None = None,
) -> StagedWork:
    """Compute every core still to do, on Ray when ``ray`` is a started Ray module (on ``actors`` when the
    session keeps them), else in this process."""
    progress = progress or Silent()
    clock = time.perf_counter()
    prepared = work.prepared
    name = prepared.name
    progress.stage(
        name, "segment", f"{len(work.todo)} cores to compute, {work.resumed} resumed, {work.skipped} nodata"
    )
    spec = work_spec(prepared, options)
    on_core = progress.cores(name, len(work.todo))
    with_context = scene_context_used(options, prepared.checkpoint.metadata)
    if options.engine == "ray" and ray is not None:
        work.cluster = RunStats()
        work.computed = _compute_on_ray(
            ray, work, spec, options, with_context, on_core, progress, work.cluster, actors
        )
        work.runtimes = work.cluster.runtimes
    else:
        work.computed = _compute_in_process(work, spec, with_context, on_core, progress)
    prepared.timings["segment"] = time.perf_counter() - clock
    return work


def segment_scene(
    scene_path: Source,
    checkpoint: Path,
    out_dir: Path,
    options: SegmentOptions,
    ray: Any = None,
    progress: Progress | None = None,
    actors: KeptActors | None = None,
) -> SegmentResult:
    """One scene, end to end; ``ray`` is a started Ray module when ``options.engine == "ray"``, ``actors``
    the session's kept actors (else the scene starts and stops its own)."""
    options = for_output_folder(options, out_dir)
    prepared = prepare_scene(scene_path, checkpoint, options, progress=progress)
    if ray is not None and actors is not None and options.engine == "ray":
        start_actors(prepared, options, actors)
    work = stage_work(prepared, out_dir, options, progress)
    return publish_work(compute_work(work, options, ray, progress, actors), out_dir, options, progress)


def _compute_in_process(
    work: StagedWork, spec: WorkSpec, with_context: bool, on_core: CoreDone, progress: Progress
) -> int:
    """The local engine: the Ray engine's workers, called in this process; one model load for both passes."""
    if not work.todo:
        return 0
    model = ModelWorker(
        str(work.prepared.checkpoint.path), spec.device, None, spec.amp, None, spec.runtime, spec.onnx_cache
    )
    image = work.staged.image()
    if with_context:
        spec = _with_scene_context(
            work, spec, progress, lambda cores: local_context_sums(model, image, cores, spec.batch_size)
        )
    work.runtimes = [model.runtime_name()]
    crf = CRFWorker()
    for batch in window_batches(work.todo, spec.batch_size):
        windows = read_windows(image, batch)
        if spec.crf_on_actors and (params := spec.crf) is not None:
            results = model.predict_for(windows, spec)
            cores = [
                [
                    crf.refine_core(
                        result, window, params, spec.input_max, tile, spec.probabilities, spec.crf_backend
                    )
                    for tile, _ in members
                ]
                for members, window, result in zip(batch, windows, results, strict=True)
            ]
        else:
            cores = model.segment_cores(windows, tiles_of(batch), spec)
        for members, planes_of_window in zip(batch, cores, strict=True):
            for (tile, valid), planes in zip(members, planes_of_window, strict=True):
                write_core(work.ledger, tile, valid, planes)
                on_core()
    return len(work.todo)


def _with_scene_context(
    work: StagedWork, spec: WorkSpec, progress: Progress, sums_of: Callable[[list[Work]], np.ndarray]
) -> WorkSpec:
    """``spec`` with the scene's pooled features (--context scene) over every valid core, computed once per
    ledger key. ``sums_of`` runs the context pass on the engine in use. Kept beside the ledger: a resumed run
    reuses it, so its cores see the same vector as the first run's."""
    progress.stage(work.prepared.name, "context", "pooled features of the whole scene")
    return replace(spec, context=_scene_context(work, sums_of))


def _scene_context(work: StagedWork, sums_of: Callable[[list[Work]], np.ndarray]) -> np.ndarray:
    path = work.staged.folder / "context.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == work.ledger.key:
            return np.asarray(saved["context"], dtype=np.float64)
    every_core, _ = cores_to_compute(work.prepared.plan.tiles, work.staged.valid())
    context = context_of(sums_of(every_core))
    write_text_atomically(path, json.dumps({"key": work.ledger.key, "context": context.tolist()}))
    return context


def _compute_on_ray(
    ray: Any,
    work: StagedWork,
    spec: WorkSpec,
    options: SegmentOptions,
    with_context: bool,
    on_core: CoreDone,
    progress: Progress,
    stats: RunStats,
    actors: KeptActors | None,
) -> int:
    """Both passes (scene context when asked, then the cores) on one set of actors: one model load each,
    for the whole batch when the session keeps its actors."""
    if not work.todo:
        return 0
    checkpoint = work.prepared.checkpoint
    storage = StorageCheck(ray, work.staged.folder, checkpoint.path, checkpoint.sha256)
    image = work.staged.image()
    gpus = options.gpus_per_model_actor
    with ExitStack() as stack:
        if actors is not None:
            pools = actors.pools(checkpoint.path, checkpoint.sha256, spec, gpus, stats.pools)
            stack.callback(actors.discard_unless_idle, pools)  # a failed scene's work may still be queued
        else:
            pools = stack.enter_context(
                actor_pools(
                    ray, checkpoint.path, spec, gpus, stats.pools, options.keep_warm_s, checkpoint.sha256
                )
            )
        if with_context:
            spec = _with_scene_context(
                work,
                spec,
                progress,
                lambda cores: scene_context_sums(ray, image, cores, pools, before_work=storage.result),
            )
        return run_tiles(
            ray,
            image,
            work.todo,
            work.ledger,
            checkpoint.path,
            spec,
            options.max_in_flight,
            on_core,
            stats,
            options.gpus_per_model_actor,
            before_work=storage.result,
            pools=pools,
        )
