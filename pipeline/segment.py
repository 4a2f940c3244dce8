"""Segment scenes: preflight -> stage into zarr -> tile -> model -> dense CRF -> ledger -> publish.

This is the single-process engine: the same stages and resume semantics the Ray engine distributes.
Each finished core is written into ``labels.zarr`` and recorded in the scene's ledger; running the same
command again computes only missing cores, and the published mask is identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.atomic import write_text_atomically
from models.checkpoint import LoadedModel, file_sha256, load_checkpoint, read_metadata
from models.errors import DataError, DeepLabError
from models.inference import pick_device
from models.metadata import CheckpointMetadata, CRFParams
from models.version import software_version
from pipeline.areas import class_areas_m2
from pipeline.grid import Tile, core_of, plan_tiles, read_padded
from pipeline.ledger import Ledger, result_key
from pipeline.publish import write_mask_cog, write_quicklook
from pipeline.sources import Scene, describe
from pipeline.stage import StagedScene, stage_scene
from pipeline.workers import CRFWorker, ModelWorker, same_shape_batches, write_core


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tile: int = Field(512, ge=16)
    halo: int = Field(64, ge=0)
    crf: bool = True
    crf_params: CRFParams | None = None
    scales: tuple[float, ...] = (1.0,)
    fuse: str = Field("max", pattern="^(max|mean)$")
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    allow_ungeoreferenced: bool = False
    engine: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    max_in_flight: int = Field(8, ge=1)
    amp: bool = True


@dataclass
class SegmentResult:
    scene: Path
    mask: Path
    report: Path
    quicklook: Path
    details: dict[str, Any] = field(default_factory=dict)


def preflight(scene: Scene, metadata: CheckpointMetadata, options: SegmentOptions) -> None:
    """Every problem on its own line, each naming the file."""
    problems = []
    if scene.bands != metadata.num_bands:
        problems.append(f"has {scene.bands} band(s) but the model expects {metadata.num_bands}")
    if not scene.georeferenced and not options.allow_ungeoreferenced:
        problems.append("has no CRS/transform (use --allow-ungeoreferenced to segment it anyway)")
    if problems:
        raise DataError("\n".join(f"{scene.path}: {p}" for p in problems))


def segment_scene(
    scene_path: Path, checkpoint: Path, out_dir: Path, options: SegmentOptions, ray: Any = None
) -> SegmentResult:
    """One scene, end to end; ``ray`` is a started Ray module when ``options.engine == "ray"``."""
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()
    loaded = load_checkpoint(checkpoint, device=pick_device(options.device))
    scene = describe(scene_path)
    preflight(scene, loaded.metadata, options)
    checksum = file_sha256(Path(scene_path))
    timings["preflight"] = time.perf_counter() - clock

    clock = time.perf_counter()
    work = Path(out_dir) / ".work"
    staged = stage_scene(scene_path, work, options.tile, checksum)
    timings["stage"] = time.perf_counter() - clock

    crf_params = options.crf_params or loaded.metadata.crf
    key = result_key(
        input=checksum,
        checkpoint=loaded.sha256,
        tile=options.tile,
        halo=options.halo,
        crf=crf_params.model_dump() if options.crf else None,
        scales=options.scales,
        fuse=options.fuse,
    )
    ledger = Ledger(staged.folder, key, (scene.height, scene.width), options.tile)
    resumed = ledger.done_count

    clock = time.perf_counter()
    tiles = plan_tiles(scene.height, scene.width, options.tile, options.halo)
    valid_store = staged.valid()
    todo, skipped = [], 0
    for tile in tiles:
        if ledger.is_done(tile.row, tile.col):
            continue
        core_valid = valid_store[
            tile.core_top : tile.core_top + tile.core_height,
            tile.core_left : tile.core_left + tile.core_width,
        ]
        if not core_valid.any():
            skipped += 1  # left nodata, never computed
            continue
        todo.append((tile, np.asarray(core_valid)))
    if options.engine == "ray" and ray is not None:
        computed = _compute_on_ray(ray, staged, loaded, ledger, todo, options, crf_params)
    else:
        computed = _compute(staged, loaded, ledger, todo, options, crf_params)
    timings["segment"] = time.perf_counter() - clock

    clock = time.perf_counter()
    target = Path(out_dir) / scene.scene_id
    labels = ledger.labels()
    mask_path, quicklook_path, report_path = (
        target / "mask.tif",
        target / "quicklook.png",
        target / "report.json",
    )
    write_mask_cog(
        labels, scene, loaded.metadata.classes, _provenance(loaded, options, crf_params, checksum), mask_path
    )
    write_quicklook(staged.image(), labels, loaded.metadata.classes, quicklook_path)
    timings["publish"] = time.perf_counter() - clock
    total = time.perf_counter() - started
    details = _report(
        scene,
        loaded,
        labels,
        options,
        crf_params,
        checksum,
        timings,
        total,
        {"total": len(tiles), "computed": computed, "skipped": skipped, "resumed": resumed},
    )
    write_text_atomically(report_path, json.dumps(details, indent=2))
    return SegmentResult(Path(scene_path), mask_path, report_path, quicklook_path, details)


def _compute(
    staged: StagedScene,
    loaded: LoadedModel,
    ledger: Ledger,
    todo: list[tuple[Tile, np.ndarray]],
    options: SegmentOptions,
    crf_params: CRFParams,
) -> int:
    """The local engine: the Ray engine's workers, called in this process."""
    image = staged.image()
    model = ModelWorker(str(loaded.path), options.device, None, options.amp, loaded=loaded)
    crf = CRFWorker()
    for group in same_shape_batches(todo, options.batch_size):
        windows = [read_padded(image, tile) for tile, _ in group]
        results = model.predict(windows, options.scales, options.fuse, options.crf)
        for (tile, valid), window, result in zip(group, windows, results, strict=True):
            if options.crf:
                labels = crf.refine_core(result, window, crf_params, loaded.metadata.input_max, tile)
            else:
                labels = core_of(result, tile)
            write_core(ledger, tile, valid, labels)
    return len(todo)


def _compute_on_ray(
    ray: Any,
    staged: StagedScene,
    loaded: LoadedModel,
    ledger: Ledger,
    todo: list[tuple[Tile, np.ndarray]],
    options: SegmentOptions,
    crf_params: CRFParams,
) -> int:
    from pipeline.ray_engine import ActorPlan, run_tiles

    resources = ray.cluster_resources()
    plan = ActorPlan.for_resources(resources.get("CPU", 1.0), resources.get("GPU", 0.0), options.crf)
    return run_tiles(
        ray,
        staged.image(),
        todo,
        ledger,
        loaded.path,
        plan,
        crf_params if options.crf else None,
        loaded.metadata.input_max,
        options.scales,
        options.fuse,
        options.batch_size,
        options.device,
        options.max_in_flight,
        options.amp,
    )


def segment_scenes(
    scenes: list[Path], checkpoint: Path, out_dir: Path, options: SegmentOptions
) -> Iterator[tuple[Path, SegmentResult | DeepLabError]]:
    """Every scene in turn on one Ray session; a failed scene is reported and the others go on.

    The checkpoint and every scene are checked before Ray starts: a bad checkpoint stops the batch at once,
    and a scene that fails its preflight never costs a cluster start.
    """
    metadata = read_metadata(checkpoint)
    ready = []
    for scene in scenes:
        try:
            preflight(describe(scene), metadata, options)
            ready.append(scene)
        except DeepLabError as exc:
            yield scene, exc
    if not ready:
        return
    if options.engine == "local":
        for scene in ready:
            yield scene, _attempt(scene, checkpoint, out_dir, options, None)
        return
    from pipeline.ray_engine import ray_session

    with ray_session(Path(out_dir) / ".work", options.ray_address) as ray:
        for scene in ready:
            yield scene, _attempt(scene, checkpoint, out_dir, options, ray)


def _attempt(
    scene: Path, checkpoint: Path, out_dir: Path, options: SegmentOptions, ray: Any
) -> SegmentResult | DeepLabError:
    try:
        return segment_scene(scene, checkpoint, out_dir, options, ray)
    except DeepLabError as exc:
        return exc


def _report(
    scene: Scene,
    loaded: LoadedModel,
    labels: Any,
    options: SegmentOptions,
    crf_params: CRFParams,
    checksum: str,
    timings: dict[str, float],
    total: float,
    tiles: dict[str, int],
) -> dict[str, Any]:
    classes = loaded.metadata.classes
    per_row = np.zeros((scene.height, len(classes)), dtype=np.int64)
    for top in range(0, scene.height, options.tile):
        rows = np.asarray(labels[top : top + options.tile])
        for offset, row in enumerate(rows):
            per_row[top + offset] = np.bincount(row[row < len(classes)], minlength=len(classes))[
                : len(classes)
            ]
    areas = class_areas_m2(per_row, scene.crs, scene.transform)
    return {
        "scene": str(scene.path),
        "input_sha256": checksum,
        "shape": [scene.height, scene.width],
        "crs": scene.crs.to_string() if scene.crs else None,
        "pixel_size_m": scene.pixel_size_m(),
        "tiles": tiles,
        "tile": options.tile,
        "halo": options.halo,
        "class_pixels": {c.name: int(n) for c, n in zip(classes, per_row.sum(0), strict=True)},
        "class_areas_m2": None
        if areas is None
        else {c.name: float(a) for c, a in zip(classes, areas, strict=True)},
        "model": loaded.metadata.architecture,
        "checkpoint": loaded.path.name,
        "checkpoint_sha256": loaded.sha256,
        "crf": crf_params.model_dump() if options.crf else None,
        "scales": list(options.scales),
        "seconds": {k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 3)},
        "megapixels_per_second": round(scene.height * scene.width / 1e6 / max(total, 1e-9), 4),
        "software_version": software_version(),
    }


def _provenance(
    loaded: LoadedModel, options: SegmentOptions, crf_params: CRFParams, checksum: str
) -> dict[str, str]:
    metadata = loaded.metadata
    return {
        "DEEPLAB_MODEL": metadata.architecture,
        "DEEPLAB_CHECKPOINT": loaded.path.name,
        "DEEPLAB_CHECKPOINT_SHA256": loaded.sha256,
        "DEEPLAB_CLASSES": json.dumps([c.name for c in metadata.classes]),
        "DEEPLAB_CRF": json.dumps(crf_params.model_dump()) if options.crf else "off",
        "DEEPLAB_TILE": str(options.tile),
        "DEEPLAB_HALO": str(options.halo),
        "DEEPLAB_SCALES": ",".join(f"{s:g}" for s in options.scales),
        "DEEPLAB_INPUT_SHA256": checksum,
        "DEEPLAB_VERSION": software_version(),
    }
