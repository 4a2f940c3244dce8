"""Scenes with vector labels as training data: each scene's grid at the training pixel size, cut into ground
blocks that are split into training and validation by ground, and read block by block, crop by crop (pixels
through GDAL, the mask rasterised from the polygons for just that window)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.transform import Affine
from rasterio.windows import Window

from deeplab_common.errors import DataError
from models.augment import clipped, padded
from models.data import ground_pixel_size
from models.object_metrics import objects_in
from models.training_images import TrainingImage
from models.vector_labels import LabelSet, default_aoi, rasterise_labels, read_aoi

METRES_PER_DEGREE = 111_320.0
SLIVER = 0.001  # a block sharing less of its area than this with a box only touches it (rounding of edges)


@dataclass(frozen=True)
class SceneRules:
    """How labels become masks on a scene: the class of unlabelled ground inside the area of interest, which
    class wins where polygons overlap, and the value of pixels that do not count."""

    background: int
    priority: tuple[int, ...]
    ignore_index: int


@dataclass
class LabelledImage(ABC):
    """An image and the labels that fall on it, on a grid at the training pixel size: a georeferenced scene
    (labels in its CRS) or a slide (labels in its level-0 pixels). Subclasses read the pixels."""

    path: Path
    transform: Affine  # the image's own pixels -> the labels' coordinates
    height: int
    width: int
    bands: int
    scale: float  # image pixels per training pixel
    labels: LabelSet  # in the labels' coordinates: the scene's CRS, or the slide's level-0 pixels
    aoi: shapely.Geometry | None  # None: all of it counts
    rules: SceneRules
    pixel_size_m: float | None  # of the training grid

    @abstractmethod
    def read_pixels(self, top: int, left: int, rows: int, cols: int, step: int) -> np.ndarray:
        """(bands, rows // step, cols // step) raw values of a window of the training grid."""

    def valid_pixels(self, top: int, left: int, rows: int, cols: int, step: int) -> np.ndarray | None:
        """Where the image has data (None: everywhere); the rest is ignored."""
        return None

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to another process
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (int(self.height / self.scale), int(self.width / self.scale))

    def grid_transform(self, top: int, left: int, step: int = 1) -> Affine:
        """The transform of a window of the training grid, every ``step``-th training pixel."""
        return (
            self.transform
            @ Affine.translation(left * self.scale, top * self.scale)
            @ Affine.scale(self.scale * step)
        )

    def read(
        self, top: int, left: int, rows: int, cols: int, step: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw pixels and the rasterised mask of a window of the training grid (inside the grid)."""
        out_rows, out_cols = max(1, rows // step), max(1, cols // step)
        image = self.read_pixels(top, left, rows, cols, step)
        mask = rasterise_labels(
            self.labels,
            self.grid_transform(top, left, step),
            (out_rows, out_cols),
            self.aoi,
            self.rules.background,
            self.rules.priority,
            self.rules.ignore_index,
        )
        valid = self.valid_pixels(top, left, rows, cols, step)
        if valid is not None:
            mask[~valid] = self.rules.ignore_index
        return torch.from_numpy(np.array(image, copy=True)), torch.from_numpy(mask)

    def bounds_of(self, top: int, left: int, rows: int, cols: int) -> tuple[float, float, float, float]:
        transform = self.grid_transform(top, left)
        x0, y0 = transform @ (0, 0)
        x1, y1 = transform @ (cols, rows)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@dataclass
class LabelledScene(LabelledImage):
    """A georeferenced scene read through GDAL; its nodata, alpha or mask band is ignored."""

    crs: CRS | None = None
    has_mask: bool = False

    def _dataset(self) -> Any:
        if "_open" not in self.__dict__:
            self.__dict__["_open"] = rasterio.open(self.path)
        return self.__dict__["_open"]

    def _window(self, top: int, left: int, rows: int, cols: int) -> Window:
        return Window(left * self.scale, top * self.scale, cols * self.scale, rows * self.scale)

    def read_pixels(self, top: int, left: int, rows: int, cols: int, step: int) -> np.ndarray:
        out_shape = (self.bands, max(1, rows // step), max(1, cols // step))
        resampling = Resampling.bilinear if self.scale * step != 1 else Resampling.nearest
        window = self._window(top, left, rows, cols)
        return np.asarray(self._dataset().read(window=window, out_shape=out_shape, resampling=resampling))

    def valid_pixels(self, top: int, left: int, rows: int, cols: int, step: int) -> np.ndarray | None:
        if not self.has_mask:
            return None
        window = self._window(top, left, rows, cols)
        shape = (max(1, rows // step), max(1, cols // step))
        return np.asarray(self._dataset().dataset_mask(window=window, out_shape=shape)) > 0


@dataclass
class SceneBlock(TrainingImage):
    """A square of ground of one scene; crops never reach past its edges, so no crop straddles the split."""

    scene: LabelledImage
    top: int
    left: int
    rows: int
    cols: int
    split: str = "train"

    def __post_init__(self) -> None:
        self.name = f"{self.scene.path.stem}@{self.top},{self.left}"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def pixel_size_m(self) -> float | None:
        return self.scene.pixel_size_m

    def window(self, top: int, left: int, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, col, rows, cols, dst_top, dst_left = clipped(top, left, size, self.rows, self.cols)
        if rows == 0 or cols == 0:
            image = torch.zeros((self.scene.bands, 0, 0))
            return padded(image, torch.zeros((0, 0), dtype=torch.int64), 0, 0, size, ignore_index)
        image, mask = self.scene.read(self.top + row, self.left + col, rows, cols)
        return padded(image, mask, dst_top, dst_left, size, ignore_index)

    def whole(self, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scene.read(self.top, self.left, self.rows, self.cols, step)

    @property
    def transform(self) -> Affine:
        return self.scene.grid_transform(self.top, self.left)

    @property
    def where(self) -> str:
        return f"{self.scene.path} (the block at row {self.top}, column {self.left})"

    def truth_objects(self, truth: np.ndarray, class_id: int) -> list[shapely.Geometry]:
        """The label polygons of ``class_id`` mostly inside this block and its area of interest."""
        labels = self.scene.labels
        area = shapely.box(*self.scene.bounds_of(self.top, self.left, self.rows, self.cols))
        if self.scene.aoi is not None:
            area = area.intersection(self.scene.aoi)
        polygons = [g for g, c in zip(labels.geometries, labels.class_ids, strict=True) if c == class_id]
        return objects_in(polygons, area)

    def record(self) -> dict[str, Any]:
        return {
            "scene": self.scene.path.name,
            "row": self.top,
            "col": self.left,
            "size": [self.rows, self.cols],
            "bounds": [round(v, 9) for v in self.scene.bounds_of(self.top, self.left, self.rows, self.cols)],
            "split": self.split,
        }


def open_scene(
    path: Path,
    labels: list[LabelSet],
    rules: SceneRules,
    aoi: str | None,
    aoi_buffer_m: float,
    pixel_size: float | None,
) -> LabelledScene:
    """A scene with the labels that fall on it, reprojected to its CRS, and its area of interest: a polygon
    file, ``"extent"`` (the whole scene) or, by default, where labels exist buffered by ``aoi_buffer_m``."""
    if not path.is_file():
        raise DataError(f"{path}: scene does not exist")
    try:
        dataset = rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise DataError(f"{path}: not a readable raster ({error})") from None
    with dataset:
        crs, transform, height, width = dataset.crs, dataset.transform, dataset.height, dataset.width
        bands = dataset.count
        has_mask = any(MaskFlags.all_valid not in flags for flags in dataset.mask_flag_enums)
    if crs is None:
        raise DataError(f"{path}: not georeferenced; vector labels cannot be placed on it")
    own_size = ground_pixel_size(crs, transform, height, width)
    scale = 1.0 if pixel_size is None or own_size is None else pixel_size / own_size
    if abs(scale - 1) < 0.01:
        scale = 1.0
    merged = labels_on(path, labels, crs, shapely.box(*_bounds(transform, width, height)))
    buffer = aoi_buffer_m / METRES_PER_DEGREE if crs.is_geographic else aoi_buffer_m
    area = area_of_interest(aoi, merged, buffer)
    scene_size = None if own_size is None else own_size * scale
    return LabelledScene(
        path,
        transform,
        height,
        width,
        bands,
        scale,
        merged,
        area,
        rules,
        scene_size,
        crs=crs,
        has_mask=has_mask,
    )


def labels_on(path: Path, labels: list[LabelSet], crs: CRS | None, footprint: shapely.Geometry) -> LabelSet:
    """The polygons of all label files that fall on an image, in its coordinates, in one set."""
    geometries, class_ids, ids = [], [], []
    for label in (label.in_crs(crs) for label in labels):
        for geometry, class_id, feature in zip(
            label.geometries, label.class_ids, label.feature_ids, strict=True
        ):
            if geometry.intersects(footprint):
                geometries.append(geometry)
                class_ids.append(class_id)
                ids.append(f"{label.path.name}:{feature}")
    return LabelSet(path, "", crs, tuple(geometries), tuple(class_ids), tuple(ids))


def area_of_interest(aoi: str | None, labels: LabelSet, buffer: float) -> shapely.Geometry | None:
    """None (all of the image) for ``"extent"``; a polygon file's union; by default where ``labels`` lie,
    grown by ``buffer`` (empty where no label falls: `check_labels_land` says so)."""
    if aoi == "extent":
        return None
    if aoi:
        return read_aoi(aoi, labels.crs)
    return default_aoi([labels], buffer)


def _bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = transform @ (0, 0)
    x1, y1 = transform @ (width, height)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def check_labels_land(labels: list[LabelSet], scenes: Sequence[LabelledImage]) -> None:
    """A label file none of whose polygons falls on any scene is an error: a wrong CRS or the wrong file; so
    is a scene without labels whose area of interest is where labels are."""
    for label in labels:
        names = {f"{label.path.name}:{feature}" for feature in label.feature_ids}
        if not any(names & set(scene.labels.feature_ids) for scene in scenes):
            where = "; ".join(
                f"{s.path.name} {tuple(round(v, 6) for v in s.bounds_of(0, 0, *s.grid_shape))}"
                for s in scenes
            )
            raise DataError(
                f"{label.path}: none of its {label.count} polygons falls on a scene ({where}); "
                "a wrong CRS, or labels of another place"
            )
    for scene in scenes:
        if scene.aoi is not None and scene.aoi.is_empty:
            files = ", ".join(str(label.path) for label in labels)
            raise DataError(
                f"{scene.path}: no label falls on this scene (labels: {files}); "
                "give --aoi extent if all of it is background"
            )


def ground_blocks(scene: LabelledImage, size: int) -> list[SceneBlock]:
    """The scene's training grid in squares of ``size`` pixels (the last row and column smaller), those that
    reach the area of interest."""
    rows, cols = scene.grid_shape
    blocks = []
    for top in range(0, rows, size):
        for left in range(0, cols, size):
            block = SceneBlock(scene, top, left, min(size, rows - top), min(size, cols - left))
            ground = shapely.box(*scene.bounds_of(top, left, block.rows, block.cols))
            if scene.aoi is None or scene.aoi.intersection(ground).area > SLIVER * ground.area:
                blocks.append(block)
    return blocks


def split_blocks(
    blocks: list[SceneBlock],
    val_bbox: tuple[float, float, float, float] | None,
    val_fraction: float,
    seed: int,
) -> tuple[list[SceneBlock], list[SceneBlock], int]:
    """(train, val, left out). With ``val_bbox`` (in the scenes' CRS): blocks centred in it validate, blocks
    that only touch it are left out (they share ground with validation); else a seeded ``val_fraction`` of
    the blocks validates."""
    train, val, left_out = [], [], 0
    if val_bbox is not None:
        area = shapely.box(*val_bbox)
        for block in blocks:
            bounds = block.scene.bounds_of(block.top, block.left, block.rows, block.cols)
            box = shapely.box(*bounds)
            if area.contains(box.centroid):
                val.append(block)
            elif box.intersection(area).area > SLIVER * box.area:
                left_out += 1
            else:
                train.append(block)
    else:
        order = np.random.default_rng(seed).permutation(len(blocks))
        count = math.ceil(len(blocks) * val_fraction) if val_fraction > 0 else 0
        chosen = set(int(i) for i in order[:count])
        val = [b for i, b in enumerate(blocks) if i in chosen]
        train = [b for i, b in enumerate(blocks) if i not in chosen]
    for block in val:
        block.split = "val"
    return train, val, left_out


def region_block(scene: LabelledImage, bbox: tuple[float, float, float, float] | None) -> SceneBlock:
    """One block over all of a scene, or over the part of it inside ``bbox`` (in its CRS)."""
    rows, cols = scene.grid_shape
    if bbox is None:
        return SceneBlock(scene, 0, 0, rows, cols, split="val")
    inverse = ~scene.grid_transform(0, 0)
    corners = [inverse @ (x, y) for x in (bbox[0], bbox[2]) for y in (bbox[1], bbox[3])]
    left = max(0, math.floor(min(c[0] for c in corners) + 1e-6))
    right = min(cols, math.ceil(max(c[0] for c in corners) - 1e-6))
    top = max(0, math.floor(min(c[1] for c in corners) + 1e-6))
    bottom = min(rows, math.ceil(max(c[1] for c in corners) - 1e-6))
    if right <= left or bottom <= top:
        raise DataError(f"{scene.path}: the box {bbox} does not overlap the scene")
    return SceneBlock(scene, top, left, bottom - top, right - left, split="val")
