"""Whole-slide images with QuPath annotations as training and evaluation data: the slide's working grid at the
model's µm/px (read by the engine's own slide reader), the annotations rasterised from their level-0 pixel
coordinates crop by crop, and chips only inside the annotated regions (unannotated tissue is ignored)."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio.transform import Affine

from deeplab_common.errors import ConfigError, DataError
from models.scene_blocks import (
    LabelledImage,
    SceneBlock,
    area_of_interest,
    check_labels_land,
    labels_on,
    region_block,
)
from models.scene_training import (
    SceneTrainingData,
    SceneTrainingSpec,
    read_label_files,
    scene_rules,
    training_blocks,
    validation_spec,
)
from models.vector_labels import LabelSet
from pipeline.io.slides import SlideInfo, describe_slide, open_slide, read_working_block

MICRONS_PER_METRE = 1e6


@dataclass
class AnnotatedSlide(LabelledImage):
    """A slide whose labels are polygons in its level-0 pixels."""

    info: SlideInfo | None = None

    def _slide(self) -> Any:
        if "_open" not in self.__dict__:
            stack = ExitStack()
            self.__dict__["_stack"] = stack
            self.__dict__["_open"] = stack.enter_context(open_slide(self.path))
        return self.__dict__["_open"]

    def read_pixels(self, top: int, left: int, rows: int, cols: int, step: int) -> np.ndarray:
        assert self.info is not None
        working = 1.0 / (self.scale * step)  # working pixels per level-0 pixel
        out_rows, out_cols = max(1, rows // step), max(1, cols // step)
        return read_working_block(
            self._slide(), self.info, working, top // step, left // step, out_rows, out_cols
        )


def open_annotated_slide(
    path: Path, labels: list[LabelSet], spec: SceneTrainingSpec, pixel_size_m: float | None
) -> AnnotatedSlide:
    """A slide at ``pixel_size_m`` (None: level 0) with the annotations that fall on it; its area of interest
    is the annotated regions (or ``--aoi``)."""
    if not path.exists():
        raise DataError(f"{path}: slide does not exist")
    info = describe_slide(path)
    if info.mpp is None and pixel_size_m is not None:
        raise DataError(f"{path}: no µm/px in the slide's metadata, so it cannot be read at the model's")
    width, height = info.level_dimensions[0]
    scale = 1.0
    if pixel_size_m is not None and info.mpp is not None:
        scale = max(1.0, pixel_size_m * MICRONS_PER_METRE / info.mpp)  # never finer than level 0
        scale = 1.0 if abs(scale - 1) < 0.01 else scale
    merged = labels_on(path, labels, None, shapely.box(0, 0, width, height))
    area = area_of_interest(spec.aoi, merged, 0.0)
    size = None if info.mpp is None else info.mpp * scale / MICRONS_PER_METRE
    return AnnotatedSlide(
        path, Affine.identity(), height, width, 3, scale, merged, area, scene_rules(spec), size, info=info
    )


def annotated_slides(
    spec: SceneTrainingSpec, slides: tuple[Path, ...]
) -> tuple[list[LabelSet], list[AnnotatedSlide]]:
    if not slides:
        raise ConfigError("--slides: give at least one slide")
    if not spec.labels:
        raise ConfigError("--labels: give the QuPath annotations (GeoJSON) with --slides")
    labels = read_label_files(spec)
    pixels = [label for label in labels if label.crs is not None]
    if pixels:
        raise DataError(
            f"{pixels[0].path}: has a CRS ({pixels[0].crs}); slide annotations are level-0 pixels"
        )
    opened = [open_annotated_slide(Path(path), labels, spec, spec.pixel_size_m) for path in slides]
    check_labels_land(labels, opened)
    return labels, opened


def slide_training_data(spec: SceneTrainingSpec, slides: tuple[Path, ...]) -> SceneTrainingData:
    """Ground blocks of the slides' annotated regions, split by ``spec.val_bbox`` (level-0 pixels) or a
    seeded fraction, as scenes are."""
    labels, opened = annotated_slides(spec, slides)
    source = {"source": "slides+QuPath annotations", "slides": [{"file": Path(p).name} for p in slides]}
    validation = annotated_slides(validation_spec(spec), slides) if spec.val_labels else None
    return training_blocks(spec, labels, opened, source, {"kind": "annotated regions"}, validation)


def slide_evaluation_blocks(
    spec: SceneTrainingSpec, slides: tuple[Path, ...]
) -> tuple[list[LabelSet], list[SceneBlock]]:
    """One block per slide: all of it, or its part inside ``spec.val_bbox`` (level-0 pixels)."""
    labels, opened = annotated_slides(spec, slides)
    return labels, [region_block(slide, spec.val_bbox) for slide in opened]
