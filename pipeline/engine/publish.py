"""Publish a computed scene: its publisher writes the mask (and confidence), then the quicklook, the polygons
and the typed report, all moved into the scene's folder together once every one is written."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_common import faults
from deeplab_common.atomic import partial_name, replace_durably
from deeplab_common.version import software_version
from models.checkpoint import CheckpointInfo
from models.metadata import CRFParams
from pipeline.engine.grid import has_image_pooling
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import inside, remove_path
from pipeline.engine.plan import Progress, ScenePlan
from pipeline.engine.scenes import ComputedScene
from pipeline.engine.workers import peak_rss_mb
from pipeline.io.areas import class_areas_m2
from pipeline.io.cog import write_quicklook
from pipeline.io.publishers import Publication, Publisher
from pipeline.io.readers import reader_of
from pipeline.io.report import REPORT_NAME, SceneReport, TileCounts
from pipeline.io.sources import Source
from pipeline.io.stac import ITEM_NAME, ItemFacts, scene_item, write_item
from pipeline.io.vectorize import PolygonRules, vectorize_mask


@dataclass(frozen=True, kw_only=True)
class PublishedScene:
    """A scene's outputs in its folder under ``--out``, and its report."""

    source: Source
    folder: Path
    mask: Path
    quicklook: Path
    report: SceneReport

    @property
    def report_path(self) -> Path:
        return self.folder / REPORT_NAME


def publish_scene(
    computed: ComputedScene, out_dir: Path, options: SegmentOptions, progress: Progress
) -> PublishedScene:
    """Write the mask (and the optional confidence and polygons), the quicklook and the report.

    All of them are built in a partial folder beside the scene's and moved into it (one rename each, the
    report last) only once every one is written: a scene whose publishing fails shows its previous outputs
    or none, not a new mask without its report. The partial folder of a killed run is removed by the next
    one, and the manifest records the scene only after the renames."""
    folder = inside(out_dir, Path(out_dir) / computed.name)
    building = partial_name(folder)
    shutil.rmtree(building, ignore_errors=True)
    try:
        outputs, report = _publish_into(building, computed, options, progress)
        folder.mkdir(parents=True, exist_ok=True)
        report_last = sorted(building.iterdir(), key=lambda built: (built.name == REPORT_NAME, built.name))
        for built in report_last:
            replace_durably(built, inside(out_dir, folder / built.name))
            faults.passing("publish-rename")
        # what an earlier run published and this one did not (polygons before --vectorize was dropped): the
        # folder holds exactly the outputs its report lists
        published = {built.name for built in report_last}
        for stale in [entry for entry in folder.iterdir() if entry.name not in published]:
            remove_path(stale)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    progress.stage(computed.name, "done", f"{report.total_seconds:.1f} s")  # every output in place
    return PublishedScene(
        source=computed.staged.planned.source,
        folder=folder,
        mask=folder / outputs["mask"].name,
        quicklook=folder / outputs["quicklook"].name,
        report=report,
    )


def _publish_into(
    folder: Path, computed: ComputedScene, options: SegmentOptions, progress: Progress
) -> tuple[dict[str, Path], SceneReport]:
    staged = computed.staged
    planned = staged.planned
    scene, plan, loaded = planned.scene, planned.plan, planned.checkpoint
    timings = {"preflight": planned.seconds, "stage": staged.seconds, "compute": computed.seconds}
    name = planned.name
    clock = time.perf_counter()
    progress.stage(name, "publish")
    reader = reader_of(scene)
    publisher = reader.publisher
    outputs = publisher.outputs(folder, options.probabilities, options.vectorize, options.ome_zarr)
    publication = Publication(
        scene,
        plan.shape,
        plan.check.scale,
        loaded.metadata.classes,
        _provenance(loaded, options, plan, planned.input_identity),
        staged.stores.folder / "pyramid",
        staged.stores.image(),
    )
    labels = publisher.output_grid(staged.ledger.labels(), publication)
    publisher.write_mask(labels, publication, outputs)
    if options.probabilities:
        publisher.write_confidence(staged.ledger.confidence(), publication, outputs["probabilities"])
    write_quicklook(publication.image, staged.ledger.labels(), loaded.metadata.classes, outputs["quicklook"])
    timings["publish"] = time.perf_counter() - clock
    polygons = polygon_rules = None
    if options.vectorize:
        clock = time.perf_counter()
        progress.stage(name, "vectorize")
        writer = publisher.polygon_writer
        rules = PolygonRules.for_area(
            loaded.metadata.classes,
            publisher.pixel_areas(publication),
            {"m2": options.min_area_m2, "um2": options.min_area_um2}[writer.unit],
            options.polygons_background,
        )
        polygons = vectorize_mask(
            labels,
            rules,
            writer,
            publisher.polygon_transform(publication),
            scene.crs,
            outputs["polygons"],
            plan.tiling.tile,
        )
        polygon_rules = rules.describe(writer.unit)
        timings["vectorize"] = time.perf_counter() - clock
    total = sum(timings.values())
    tiles = TileCounts(
        total=len(plan.tiles),
        computed=computed.run.cores,
        skipped=staged.nodata_cores,
        resumed=staged.resumed,
        windows=staged.windows,  # computed this run
    )
    details = _report(
        publisher, publication, loaded, labels, options, plan, planned.input_identity, timings, total, tiles
    )
    nonfinite = staged.stores.nonfinite
    if nonfinite:
        details.nonfinite_pixels = nonfinite
        details.warnings.append(
            f"{scene.path}: {nonfinite} pixel(s) with NaN or infinite samples were left as nodata"
        )
    if tiles.skipped == tiles.total:  # an empty, valid mask: said so rather than silently published
        details.warnings.append(f"{scene.path}: {reader.nothing_valid}; the mask is empty (all nodata)")
    details.outputs = {k: v.name for k, v in outputs.items()} | {"item": ITEM_NAME}
    details.peak_rss_mb = {"driver": round(peak_rss_mb(), 1)} | {
        f"{kind}_actors": [round(m, 1) for m in values] for kind, values in computed.run.actor_memory.items()
    }
    if computed.run.runtimes:
        details.runtime = ", ".join(computed.run.runtimes)
    if computed.run.cluster is not None:
        details.cluster = computed.run.cluster
    if polygons is not None:
        details.polygons = polygons
        details.polygon_rules = polygon_rules
    details.write(outputs["report"])
    write_item(
        scene_item(_item_facts(details, loaded, plan), outputs, publisher.media_types), folder / ITEM_NAME
    )
    return outputs, details


def _report(
    publisher: Publisher,
    publication: Publication,
    loaded: CheckpointInfo,
    labels: Any,
    options: SegmentOptions,
    plan: ScenePlan,
    input_identity: str,
    timings: dict[str, float],
    total: float,
    tiles: TileCounts,
) -> SceneReport:
    scene, classes = publication.scene, loaded.metadata.classes
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
        input_identity=input_identity,
        shape=[scene.height, scene.width],
        crs=scene.crs.to_string() if scene.crs else None,
        pixel_size_m=scene.pixel_size_m(),
        tiles=tiles,
        tile=plan.tiling.tile,
        halo=plan.halo,
        cores_per_window=plan.tiling.cores_per_window,
        context=options.context if has_image_pooling(loaded.metadata) else "none (no image pooling)",
        model_grid=list(plan.shape),
        warnings=plan.check.warning_lines(),
        class_pixels={c.name: int(n) for c, n in zip(classes, class_pixels, strict=True)},
        class_areas_m2=None
        if areas is None
        else {c.name: float(a) for c, a in zip(classes, areas, strict=True)},
        model=loaded.metadata.architecture,
        checkpoint=loaded.path.name,
        checkpoint_sha256=loaded.sha256,
        # every field marked as set, so that the report always lists all of the CRF's parameters
        crf=CRFParams.model_validate(plan.crf.model_dump()) if plan.crf else None,
        crf_reason=plan.crf_reason,
        scales=list(plan.multiscale.scales),
        fuse=plan.multiscale.fuse,
        tta=plan.tta,
        seconds={k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 3)},
        megapixels_per_second=round(scene.height * scene.width / 1e6 / max(total, 1e-9), 4),
        software_version=software_version(),
    )
    if plan.crf is not None:
        report.crf_backend = plan.crf_backend
        report.crf_device = options.crf_device
    skipped_share = round(tiles.skipped / max(tiles.total, 1), 4)
    section = publisher.report_section(publication, [int(n) for n in class_pixels], skipped_share)
    for name, value in section.items():
        setattr(report, name, value)  # set one by one (validated): the JSON keeps only the sections set
    return report


def _item_facts(details: SceneReport, loaded: CheckpointInfo, plan: ScenePlan) -> ItemFacts:
    classes = loaded.metadata.classes
    mpp = details.slide.working_mpp if details.slide else None
    return ItemFacts(
        scene_id=plan.check.scene.scene_id,
        classes=classes,
        class_pixels=[details.class_pixels[c.name] for c in classes],
        pixel_size_m=mpp * 1e-6 if mpp else details.pixel_size_m,
        microns_per_pixel=mpp,
        georeferenced=details.slide is None and details.crs is not None,
        processing={
            "model": details.model,
            "checkpoint": details.checkpoint,
            "checkpoint_sha256": details.checkpoint_sha256,
            "crf": details.crf.model_dump() if details.crf else None,
            **({"crf_backend": details.crf_backend} if details.crf_backend else {}),
            "scales": details.scales,
            "tta": details.tta,
            "input_identity": details.input_identity,
        },
        software_version=details.software_version,
        derived_from=plan.check.scene.derived_from,
    )


def _provenance(
    loaded: CheckpointInfo, options: SegmentOptions, plan: ScenePlan, input_identity: str
) -> dict[str, str]:
    metadata = loaded.metadata
    return {
        "DEEPLAB_MODEL": metadata.architecture,
        "DEEPLAB_CHECKPOINT": loaded.path.name,
        "DEEPLAB_CHECKPOINT_SHA256": loaded.sha256,
        "DEEPLAB_CLASSES": json.dumps([c.name for c in metadata.classes]),
        "DEEPLAB_CRF": json.dumps(plan.crf.model_dump()) if plan.crf else "off",
        **({"DEEPLAB_CRF_BACKEND": plan.crf_backend or ""} if plan.crf else {}),
        "DEEPLAB_TILE": str(plan.tiling.tile),
        "DEEPLAB_HALO": str(plan.halo),
        "DEEPLAB_MODEL_GRID_SCALE": f"{plan.check.scale:.6g}",
        "DEEPLAB_SCALES": ",".join(f"{s:g}" for s in plan.multiscale.scales),
        "DEEPLAB_FUSE": plan.multiscale.fuse,
        "DEEPLAB_TTA": plan.tta,
        "DEEPLAB_INPUT": input_identity,
        "DEEPLAB_VERSION": software_version(),
    }
