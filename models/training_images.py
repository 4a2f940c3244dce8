"""What a training run cuts its crops from, behind one base: image/mask pairs held in memory, or ground blocks
of scenes whose pixels are read and whose vector labels are rasterised crop by crop."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
import torch
from rasterio.transform import Affine

from deeplab_common.errors import DataError
from models.augment import clipped, padded
from models.data import Pair, pixel_size_m, raster_shape, read_pair
from models.object_metrics import mask_polygons


class TrainingImage(ABC):
    """One image a run trains or validates on; ``shape`` is in training pixels."""

    name: str

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def pixel_size_m(self) -> float | None: ...

    @abstractmethod
    def window(self, top: int, left: int, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A square window, padded where it leaves the image (the augment module's `CropSource`)."""

    @abstractmethod
    def whole(self, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """All of it (raw values, (bands, H, W); mask (H, W)), every ``step``-th pixel: validation uses step
        1, band statistics and class frequencies a coarser step."""

    def record(self) -> dict[str, Any]:
        return {"name": self.name}

    @property
    def where(self) -> str:
        """What a message names: the file (and the block of it)."""
        return self.name

    @property
    def transform(self) -> Affine:
        """Where ``whole()``'s pixels lie: pixel coordinates, or a scene's CRS."""
        return Affine.identity()

    def objects(self, labels: np.ndarray, class_id: int) -> list[shapely.Geometry]:
        """The regions of ``class_id`` in a label raster of this image, as polygons where its pixels lie."""
        return mask_polygons(labels, class_id, self.transform)

    def truth_objects(self, truth: np.ndarray, class_id: int) -> list[shapely.Geometry]:
        """The true objects of ``class_id``: the truth raster's regions (vector labels give their own)."""
        return mask_polygons(truth, class_id, self.transform)


@dataclass
class PairImage(TrainingImage, ABC):
    """An image/mask pair of files: named by the image's stem, placed by its georeferencing."""

    pair: Pair

    def __post_init__(self) -> None:
        self.name = self.pair.stem

    @property
    def where(self) -> str:
        return str(self.pair.image)

    @property
    def pixel_size_m(self) -> float | None:
        return pixel_size_m(self.pair.image)


@dataclass
class LoadedPair(PairImage):
    """An image/mask pair read into memory once."""

    image: torch.Tensor  # raw values, (bands, H, W)
    mask: torch.Tensor  # int64 (H, W)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def window(self, top: int, left: int, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, col, rows, cols, dst_top, dst_left = clipped(top, left, size, *self.shape)
        return padded(
            self.image[:, row : row + rows, col : col + cols],
            self.mask[row : row + rows, col : col + cols],
            dst_top,
            dst_left,
            size,
            ignore_index,
        )

    def whole(self, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image[:, ::step, ::step], self.mask[::step, ::step]


@dataclass
class PairOnDisk(PairImage):
    """An image/mask pair read each time it is asked for: evaluation streams its images one by one."""

    num_classes: int
    ignore_index: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return raster_shape(self.pair.image)

    def window(self, top: int, left: int, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.whole()
        return LoadedPair(self.pair, image, mask).window(top, left, size, ignore_index)

    def whole(self, step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(self.pair, self.num_classes, self.ignore_index)
        return torch.from_numpy(image[:, ::step, ::step]), torch.from_numpy(mask[::step, ::step])


def load_pairs(pairs: list[Pair], num_classes: int, ignore_index: int) -> list[TrainingImage]:
    loaded: list[TrainingImage] = []
    bands: int | None = None
    for pair in pairs:
        image, mask = read_pair(pair, num_classes, ignore_index)
        if bands is not None and image.shape[0] != bands:
            raise DataError(f"{pair.image}: has {image.shape[0]} bands, the other images have {bands}")
        bands = image.shape[0]
        loaded.append(LoadedPair(pair, torch.from_numpy(image), torch.from_numpy(mask)))
    return loaded


def band_statistics(data: list[TrainingImage], step: int = 1) -> tuple[list[float], list[float]]:
    totals: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    count = 0
    for item in data:
        image, _ = item.whole(step)
        values = image.double().flatten(1)
        totals = values.sum(1) if totals is None else totals + values.sum(1)
        squares = (values**2).sum(1) if squares is None else squares + (values**2).sum(1)
        count += values.shape[1]
    assert totals is not None and squares is not None
    mean = totals / count
    std = torch.sqrt(torch.clamp(squares / count - mean**2, min=1e-6))
    return mean.tolist(), std.tolist()


def class_pixel_counts(data: list[TrainingImage], num_classes: int, step: int = 1) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for item in data:
        _, mask = item.whole(step)
        valid = mask[(mask >= 0) & (mask < num_classes)]
        counts += torch.bincount(valid, minlength=num_classes).numpy()
    return counts


def median_frequency_weights(data: list[TrainingImage], num_classes: int, step: int = 1) -> list[float]:
    counts = torch.from_numpy(class_pixel_counts(data, num_classes, step)).double()
    frequency = counts / counts.sum()
    present = frequency[frequency > 0]
    median = present.median() if present.numel() else torch.tensor(1.0)
    return [float(median / f) if f > 0 else 0.0 for f in frequency]


def training_pixel_size(data: list[TrainingImage]) -> float | None:
    sizes = [s for s in (item.pixel_size_m for item in data) if s is not None]
    return float(np.median(sizes)) if sizes else None


def first_pixel(item: TrainingImage) -> torch.Tensor:
    """One pixel of an image, all its bands in its own dtype: what the checkpoint records of its input."""
    image, _ = item.whole(step=max(item.shape))
    return image


def statistics_step(data: list[TrainingImage], budget: int = 16_000_000) -> int:
    """Every how many pixels band statistics and class frequencies are taken: all of them up to ``budget``."""
    pixels = sum(item.shape[0] * item.shape[1] for item in data)
    return max(1, math.isqrt(pixels // budget))
