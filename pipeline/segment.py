"""Segment scenes: preflight -> stage into zarr -> tile -> model -> dense CRF -> ledger -> publish.

This is the single-process engine: the same stages and resume semantics the Ray engine distributes.
Each finished core is written into ``labels.zarr`` and recorded in the scene's ledger; running the same
command again computes only missing cores, and the published mask is identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from affine import Affine

from models.atomic import write_text_atomically
from models.checkpoint import CheckpointInfo, checkpoint_info
from models.metadata import TTA_PHRASES, CheckpointMetadata, CRFParams, InputScales, Tiling
from models.version import software_version
from pipeline.areas import class_areas_m2
from pipeline.grid import (
    PLAN_VERSION,
    Tile,
    core_of,
    count_windows,
    fit_blocks,
    has_image_pooling,
    model_halo,
    plan_tiles,
    resolve_tiling,
    window_warning,
)
from pipeline.ledger import Ledger, result_key
from pipeline.options import SegmentOptions
from pipeline.preflight import PreflightResult, preflight
from pipeline.publish import write_confidence_cog, write_mask_cog, write_quicklook
from pipeline.ray_engine import KeptActors, RunStats
from pipeline.regrid import NearestView
from pipeline.report import SceneReport, SlideSection, TileCounts
from pipeline.slide_publish import write_ome_pyramid, write_ome_zarr
from pipeline.slides import level_for_scale
from pipeline.sources import (
    Scene,
    Source,
    describe,
    open_blocks,
    resampled_shape,
    source_sha256,
)
from pipeline.stage import StagedScene, stage_scene
from pipeline.vectorize import vectorize_mask
from pipeline.workers import (
    CoreDone,
    CRFWorker,
    ModelWorker,
    Work,
    WorkSpec,
    context_of,
    local_context_sums,
    peak_rss_mb,
    read_windows,
    window_batches,
    write_core,
)


@dataclass
class SegmentResult:
    scene: Source
    mask: Path
    report: Path
    quicklook: Path
    details: SceneReport


class Progress(Protocol):
    """Where a run reports its stages and finished cores (the CLI draws them; tests may record them)."""

    def stage(self, scene: str, stage: str, detail: str = "") -> None: ...

    def cores(self, scene: str, total: int) -> CoreDone: ...


class Silent:
    def stage(self, scene: str, stage: str, detail: str = "") -> None:
        return None

    def cores(self, scene: str, total: int) -> CoreDone:
        return lambda: None


@dataclass(frozen=True)
class ScenePlan:
    """What a run will do for one scene, before any of it is done (``--dry-run`` prints this)."""

    check: PreflightResult
    shape: tuple[int, int]  # the grid the model runs on (the source's unless --match-resolution)
    tiling: Tiling  # the options' tile and block, else the checkpoint's
    halo: int
    tiles: list[Tile]
    crf: CRFParams | None
    tta: str  # the options' test-time views, else the checkpoint's, else none
    multiscale: InputScales  # the options' input scales and fusion, else the checkpoint's, else 1 alone

    @property
    def window(self) -> int:
        return max(t.window[2] for t in self.tiles) if self.tiles else 0

    @property
    def windows(self) -> int:
        return count_windows(self.tiles)

    def describe(self, nodata_cores: int | None = None) -> list[str]:
        scene = self.check.scene
        where = f"CRS {scene.crs.to_string() if scene.crs else 'none'}, pixel {_metres(scene.pixel_size_m())}"
        if scene.slide is not None:
            mpp = f"{scene.slide.mpp:.3g} µm/px" if scene.slide.mpp else "no µm/px"
            where = f"slide ({scene.slide.reader}), {scene.slide.levels} level(s), {mpp} at level 0"
        lines = [
            f"{scene.path}: {scene.height}x{scene.width} px, {scene.bands} band(s) {scene.dtype}, {where}"
        ]
        if self.shape != (scene.height, scene.width):
            lines.append(f"  resampled to {self.shape[0]}x{self.shape[1]} px (x{self.check.scale:.3g})")
        cores = (
            f"{len(self.tiles)} cores of {self.tiling.tile} px in blocks of {self.tiling.cores_per_window}²"
        )
        if nodata_cores is not None:
            cores += f" ({nodata_cores} wholly nodata, skipped)"
        lines.append(f"  {cores}, halo {self.halo} px, {self.windows} windows of up to {self.window} px")
        if not self.multiscale.single:
            lines.append(f"  multi-scale inputs: {self.multiscale.describe()}")
        if self.tta != "none":
            lines.append(f"  test-time views ({self.tta}): logits averaged over {TTA_PHRASES[self.tta]}")
        lines.append(f"  CRF: {self.crf.model_dump() if self.crf else 'off'}")
        lines += [f"  warning: {w}" for w in self.check.warnings]
        return lines


def plan_scene(scene: Scene, metadata: CheckpointMetadata, options: SegmentOptions) -> ScenePlan:
    """Preflight (raises on problems) and the tile plan; reads no pixels."""
    check = preflight(scene, metadata, options.allow_ungeoreferenced, options.match_resolution)
    check.raise_if_refused()
    crf = (options.crf_params or metadata.crf) if options.crf else None
    shape = resampled_shape(scene.height, scene.width, check.scale)
    tiling = resolve_tiling(metadata, options.tile, options.cores_per_window)
    multiscale = metadata.multiscale(options.scales, options.fuse)
    halo = options.halo
    if halo is None:
        scene_context = options.context == "scene"
        halo = model_halo(
            metadata, crf.sigma_alpha if crf else None, tiling.tile, scene_context, min(multiscale.scales)
        )
    tiles = plan_tiles(shape[0], shape[1], tiling.tile, halo, tiling.cores_per_window)
    plan = ScenePlan(check, shape, tiling, halo, tiles, crf, metadata.views(options.tta), multiscale)
    if options.tile is None and (warning := window_warning(metadata, plan.window, options.context)):
        check.warnings.append(warning)
    return plan


def as_planned(options: SegmentOptions, plan: ScenePlan) -> SegmentOptions:
    """``options`` with what ``plan`` resolved from the checkpoint filled in (the input scales and fusion),
    as the manifest hashes them: an unset option and the value it stands for give one key, and keys from
    before these options could be unset stay valid."""
    return options.model_copy(update={"scales": plan.multiscale.scales, "fuse": plan.multiscale.fuse})


def count_nodata_cores(scene: Scene, plan: ScenePlan) -> int:
    """Cores without one valid pixel, read from the source's mask (what a dry run can know unstaged)."""
    with open_blocks(scene, plan.check.scale) as blocks:
        return sum(
            not blocks.read_valid(t.core_top, t.core_left, t.core_height, t.core_width).any()
            for t in plan.tiles
        )


def _metres(value: float | None) -> str:
    return f"{value:.3g} m" if value else "unknown"


@dataclass
class PreparedScene:
    """A scene that passed its preflight: what it is, what runs on it and the input's checksum."""

    source: Source
    scene: Scene
    checkpoint: CheckpointInfo
    plan: ScenePlan
    checksum: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.scene.scene_id


@dataclass
class StagedWork:
    """A staged scene, its ledger and the cores still to compute."""

    prepared: PreparedScene
    staged: StagedScene
    ledger: Ledger
    todo: list[Work]
    skipped: int  # wholly nodata cores, never computed
    resumed: int  # cores a previous run recorded
    computed: int = 0

    @property
    def windows(self) -> int:
        """Windows the cores still to compute need (a block's cores share one)."""
        return count_windows([tile for tile, _ in self.todo])

    cluster: RunStats | None = None  # set by the Ray engine


def prepare_scene(
    scene_path: Source,
    checkpoint: Path | CheckpointInfo,
    options: SegmentOptions,
    checksum: str | None = None,
    progress: Progress | None = None,
) -> PreparedScene:
    """Preflight (raises on problems), the tile plan and the input's checksum (computed unless given)."""
    clock = time.perf_counter()
    # the weights are loaded where the model runs (actors or _compute), never here
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else checkpoint_info(checkpoint)
    scene = describe(scene_path, options.mpp)
    plan = plan_scene(scene, info.metadata, options)
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
    progress.stage(name, "stage")
    staged = stage_scene(
        prepared.scene, Path(out_dir) / ".work", plan.tiling.tile, prepared.checksum, plan.check.scale
    )
    prepared.timings["stage"] = time.perf_counter() - clock
    key = result_key(
        input=prepared.checksum,
        checkpoint=prepared.checkpoint.sha256,
        tile=plan.tiling.tile,
        halo=plan.halo,
        cores_per_window=plan.tiling.cores_per_window,
        crf=plan.crf.model_dump() if plan.crf else None,
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


def work_spec(prepared: PreparedScene, options: SegmentOptions) -> WorkSpec:
    """What each window of the scene goes through (before any scene context)."""
    return WorkSpec(
        crf=prepared.plan.crf,
        input_max=prepared.checkpoint.metadata.input_max,
        scales=prepared.plan.multiscale.scales,
        fuse=prepared.plan.multiscale.fuse,
        tta=prepared.plan.tta,
        batch_size=options.batch_size,
        device=options.device,
        amp=options.amp,
        with_confidence=options.probabilities,
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
    else:
        work.computed = _compute_in_process(work, spec, with_context, on_core, progress)
    prepared.timings["segment"] = time.perf_counter() - clock
    return work


def publish_work(
    work: StagedWork, out_dir: Path, options: SegmentOptions, progress: Progress | None = None
) -> SegmentResult:
    """Write the mask COG (and the optional rasters and polygons), the quicklook and the report."""
    progress = progress or Silent()
    prepared = work.prepared
    scene, plan, loaded, timings = prepared.scene, prepared.plan, prepared.checkpoint, prepared.timings
    name = prepared.name
    clock = time.perf_counter()
    progress.stage(name, "publish")
    target = Path(out_dir) / scene.scene_id
    slide = scene.slide is not None
    files = _SLIDE_OUTPUT_FILES if slide else _OUTPUT_FILES
    outputs = {
        name: target / file for name, file in files.items() if name in _ALWAYS or _wanted(name, options)
    }
    labels = _on_source_grid(work.ledger.labels(), scene, plan)
    if slide:
        # the second publisher: slide coordinates, µm/px, an OME-TIFF pyramid (no CRS, no COG)
        mpp = _working_mpp(scene, plan)
        scratch = work.staged.folder / "pyramid"
        write_ome_pyramid(labels, mpp, outputs["mask"], scratch, f"{scene.scene_id} mask")
        if options.ome_zarr:
            outputs["mask_zarr"] = target / "mask.ome.zarr"
            write_ome_zarr(labels, mpp, outputs["mask_zarr"], f"{scene.scene_id} mask")
        if options.probabilities:
            write_ome_pyramid(work.ledger.confidence(), mpp, outputs["probabilities"], scratch, "confidence")
    else:
        tags = _provenance(loaded, options, plan, prepared.checksum)
        write_mask_cog(labels, scene, loaded.metadata.classes, tags, outputs["mask"])
        if options.probabilities:
            confidence = _on_source_grid(work.ledger.confidence(), scene, plan)
            write_confidence_cog(confidence, scene, tags, outputs["probabilities"])
    write_quicklook(work.staged.image(), work.ledger.labels(), loaded.metadata.classes, outputs["quicklook"])
    timings["publish"] = time.perf_counter() - clock
    polygons = None
    if options.vectorize:
        clock = time.perf_counter()
        progress.stage(name, "vectorize")
        # a slide's polygons are in level-0 slide pixels (QuPath's coordinates)
        transform = Affine.scale(1 / plan.check.scale) if slide else scene.transform
        polygons = vectorize_mask(
            labels,
            loaded.metadata.classes,
            scene.crs,
            transform,
            outputs["polygons"],
            plan.tiling.tile,
            slide,
        )
        timings["vectorize"] = time.perf_counter() - clock
    total = sum(timings.values())
    tiles = TileCounts(
        total=len(plan.tiles),
        computed=work.computed,
        skipped=work.skipped,
        resumed=work.resumed,
        windows=work.windows,  # computed this run
    )
    actor_memory = work.cluster.actor_memory if work.cluster else {}
    details = _report(scene, loaded, labels, options, plan, prepared.checksum, timings, total, tiles)
    details.outputs = {k: v.name for k, v in outputs.items()}
    details.peak_rss_mb = {"driver": round(peak_rss_mb(), 1)} | {
        f"{kind}_actors": [round(m, 1) for m in values] for kind, values in actor_memory.items()
    }
    if work.cluster is not None:
        details.cluster = work.cluster.report()
    if polygons is not None:
        details.polygons = polygons
    details.write(outputs["report"])
    progress.stage(name, "done", f"{total:.1f} s")
    return SegmentResult(prepared.source, outputs["mask"], outputs["report"], outputs["quicklook"], details)


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
    prepared = prepare_scene(scene_path, checkpoint, options, progress=progress)
    if ray is not None and actors is not None and options.engine == "ray":
        start_actors(prepared, options, actors)
    work = stage_work(prepared, out_dir, options, progress)
    return publish_work(compute_work(work, options, ray, progress, actors), out_dir, options, progress)


_OUTPUT_FILES = {
    "mask": "mask.tif",
    "probabilities": "probabilities.tif",
    "polygons": "polygons.gpkg",
    "quicklook": "quicklook.png",
    "report": "report.json",
}
_SLIDE_OUTPUT_FILES = _OUTPUT_FILES | {
    "mask": "mask.ome.tif",
    "probabilities": "probabilities.ome.tif",
    "polygons": "polygons.geojson",
}
_ALWAYS = frozenset({"mask", "quicklook", "report"})


def _wanted(output: str, options: SegmentOptions) -> bool:
    return (output == "probabilities" and options.probabilities) or (
        output == "polygons" and options.vectorize
    )


def _empty_warning(scene: Scene, tiles: TileCounts) -> list[str]:
    """A slide without tissue (or a scene without valid data) publishes an empty, valid mask and says so."""
    if tiles.skipped < tiles.total:
        return []
    what = "no tissue found" if scene.slide is not None else "no valid pixel"
    return [f"{scene.path}: {what}; the mask is empty (all nodata)"]


def _working_mpp(scene: Scene, plan: ScenePlan) -> float:
    """µm per pixel of the grid a slide is segmented (and published) on."""
    assert scene.slide is not None
    return scene.slide.level_mpp(0) / plan.check.scale


def _on_source_grid(array: Any, scene: Scene, plan: ScenePlan) -> Any:
    """Geo scenes publish on their own grid; slides on the working grid (level 0 may be 100k px wide)."""
    if plan.shape == (scene.height, scene.width) or scene.slide is not None:
        return array
    return NearestView(array, (scene.height, scene.width), plan.check.scale)


def _compute_in_process(
    work: StagedWork, spec: WorkSpec, with_context: bool, on_core: CoreDone, progress: Progress
) -> int:
    """The local engine: the Ray engine's workers, called in this process; one model load for both passes."""
    if not work.todo:
        return 0
    model = ModelWorker(str(work.prepared.checkpoint.path), spec.device, None, spec.amp)
    image = work.staged.image()
    if with_context:
        spec = _with_scene_context(
            work, spec, progress, lambda cores: local_context_sums(model, image, cores, spec.batch_size)
        )
    crf = CRFWorker()
    for batch in window_batches(work.todo, spec.batch_size):
        windows = read_windows(image, batch)
        results = model.predict_for(windows, spec)
        for members, window, result in zip(batch, windows, results, strict=True):
            for tile, valid in members:
                if spec.crf is not None:
                    planes = crf.refine_core(
                        result, window, spec.crf, spec.input_max, tile, spec.with_confidence
                    )
                else:
                    planes = core_of(result, tile)
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
    from pipeline.cluster_storage import StorageCheck
    from pipeline.ray_engine import actor_pools, run_tiles, scene_context_sums

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


def _report(
    scene: Scene,
    loaded: CheckpointInfo,
    labels: Any,
    options: SegmentOptions,
    plan: ScenePlan,
    checksum: str,
    timings: dict[str, float],
    total: float,
    tiles: TileCounts,
) -> SceneReport:
    classes = loaded.metadata.classes
    per_row = np.zeros((scene.height, len(classes)), dtype=np.int64)
    for top in range(0, scene.height, plan.tiling.tile):
        rows = np.asarray(labels[top : top + plan.tiling.tile])
        for offset, row in enumerate(rows):
            per_row[top + offset] = np.bincount(row[row < len(classes)], minlength=len(classes))[
                : len(classes)
            ]
    areas = class_areas_m2(per_row, scene.crs, scene.transform)
    class_pixels = per_row.sum(0)
    report = SceneReport(
        scene=str(scene.path),
        input_sha256=checksum,
        shape=[scene.height, scene.width],
        crs=scene.crs.to_string() if scene.crs else None,
        pixel_size_m=scene.pixel_size_m(),
        tiles=tiles,
        tile=plan.tiling.tile,
        halo=plan.halo,
        cores_per_window=plan.tiling.cores_per_window,
        context=options.context if has_image_pooling(loaded.metadata) else "none (no image pooling)",
        model_grid=list(plan.shape),
        warnings=plan.check.warning_lines() + _empty_warning(scene, tiles),
        class_pixels={c.name: int(n) for c, n in zip(classes, class_pixels, strict=True)},
        class_areas_m2=None
        if areas is None
        else {c.name: float(a) for c, a in zip(classes, areas, strict=True)},
        model=loaded.metadata.architecture,
        checkpoint=loaded.path.name,
        checkpoint_sha256=loaded.sha256,
        # every field marked as set, so that the report always lists all of the CRF's parameters
        crf=CRFParams.model_validate(plan.crf.model_dump()) if plan.crf else None,
        scales=list(plan.multiscale.scales),
        fuse=plan.multiscale.fuse,
        tta=plan.tta,
        seconds={k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 3)},
        megapixels_per_second=round(scene.height * scene.width / 1e6 / max(total, 1e-9), 4),
        software_version=software_version(),
    )
    if scene.slide is not None:
        mpp = _working_mpp(scene, plan)
        mm2_per_px = (mpp * 1e-3) ** 2
        report.slide = SlideSection(
            reader=scene.slide.reader,
            levels=[list(d) for d in scene.slide.level_dimensions],
            level_0_mpp=scene.slide.level_mpp(0),
            level_read=level_for_scale(scene.slide, plan.check.scale)[0],
            working_mpp=mpp,
            level_0_px_per_mask_px=1 / plan.check.scale,
        )
        report.class_areas_mm2 = {
            c.name: float(n * mm2_per_px) for c, n in zip(classes, class_pixels, strict=True)
        }
        report.tissue_area_mm2 = float(class_pixels.sum() * mm2_per_px)
        report.background_cores_share = round(tiles.skipped / max(tiles.total, 1), 4)
    return report


def _provenance(
    loaded: CheckpointInfo, options: SegmentOptions, plan: ScenePlan, checksum: str
) -> dict[str, str]:
    metadata = loaded.metadata
    return {
        "DEEPLAB_MODEL": metadata.architecture,
        "DEEPLAB_CHECKPOINT": loaded.path.name,
        "DEEPLAB_CHECKPOINT_SHA256": loaded.sha256,
        "DEEPLAB_CLASSES": json.dumps([c.name for c in metadata.classes]),
        "DEEPLAB_CRF": json.dumps(plan.crf.model_dump()) if plan.crf else "off",
        "DEEPLAB_TILE": str(plan.tiling.tile),
        "DEEPLAB_HALO": str(plan.halo),
        "DEEPLAB_MODEL_GRID_SCALE": f"{plan.check.scale:.6g}",
        "DEEPLAB_SCALES": ",".join(f"{s:g}" for s in plan.multiscale.scales),
        "DEEPLAB_FUSE": plan.multiscale.fuse,
        "DEEPLAB_TTA": plan.tta,
        "DEEPLAB_INPUT_SHA256": checksum,
        "DEEPLAB_VERSION": software_version(),
    }
