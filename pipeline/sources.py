"""Open a scene: a georeferenced raster through rasterio/GDAL, described by one Scene type."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.windows import Window

from models.data import ground_pixel_size
from models.errors import DataError


@dataclass(frozen=True)
class Scene:
    path: Path
    height: int
    width: int
    bands: int
    dtype: str
    crs: CRS | None
    transform: Affine
    nodata: float | None
    has_mask: bool  # alpha band or internal/external mask
    bits: int | None = None  # significant bits per sample (GDAL NBITS), None for floats

    @property
    def full_scale(self) -> float | None:
        """Largest value the samples can hold: from NBITS when set, else the dtype; None for floats."""
        return float(2**self.bits - 1) if self.bits else None

    @property
    def scene_id(self) -> str:
        return self.path.stem

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and not self.transform.is_identity

    def pixel_size_m(self) -> float | None:
        """Ground sample distance in metres; geographic CRSs are converted at the scene's centre latitude."""
        if not self.georeferenced:
            return None
        return ground_pixel_size(self.crs, self.transform, self.height, self.width)


# GDAL's block cache defaults to 5% of RAM and fills up over a large scene; a fixed cache keeps the
# driver's memory independent of the scene's size (reads and writes are streamed block by block anyway).
GDAL_CACHE_MB = 256


def gdal_env() -> rasterio.Env:
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


@contextmanager
def open_raster(path: Path | str) -> Iterator[DatasetReader]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: scene does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: not a readable raster ({exc})") from None
    with gdal_env(), dataset:
        yield dataset


def describe(path: Path | str) -> Scene:
    with open_raster(path) as dataset:
        alpha = [c.name == "alpha" for c in dataset.colorinterp]
        flags = dataset.mask_flag_enums[0] if dataset.count else []
        has_mask = any(alpha) or any(flag.name == "per_dataset" for flag in flags)
        return Scene(
            path=Path(path),
            height=dataset.height,
            width=dataset.width,
            bands=dataset.count - sum(alpha),
            dtype=dataset.dtypes[0],
            crs=dataset.crs,
            transform=dataset.transform,
            nodata=dataset.nodata,
            has_mask=has_mask,
            bits=_sample_bits(dataset),
        )


def _sample_bits(dataset: DatasetReader) -> int | None:
    dtype = np.dtype(dataset.dtypes[0])
    if not np.issubdtype(dtype, np.integer):
        return None
    declared = dataset.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")  # a band-level item in GDAL
    sign_bit = 1 if np.issubdtype(dtype, np.signedinteger) else 0
    return int(declared) if declared else dtype.itemsize * 8 - sign_bit


def read_block(
    dataset: DatasetReader, top: int, left: int, height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """Image bands only (an alpha band is mask, not data), on a grid ``scale`` times finer than the source.

    ``top, left, height, width`` are on that grid; with ``scale != 1`` GDAL resamples bilinearly.
    """
    indexes = [i + 1 for i, c in enumerate(dataset.colorinterp) if c.name != "alpha"] or None
    if scale == 1.0:
        return np.asarray(dataset.read(indexes=indexes, window=Window(left, top, width, height)))
    bands = len(indexes) if indexes else dataset.count
    return np.asarray(
        dataset.read(
            indexes=indexes,
            window=_source_window(top, left, height, width, scale),
            out_shape=(bands, height, width),
            resampling=Resampling.bilinear,
        )
    )


def read_valid(
    dataset: DatasetReader, top: int, left: int, height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """True where the source has data: nodata value, alpha band and internal masks all honoured."""
    if scale == 1.0:
        return np.asarray(dataset.dataset_mask(window=Window(left, top, width, height))) > 0
    window = _source_window(top, left, height, width, scale)
    return np.asarray(dataset.dataset_mask(window=window, out_shape=(height, width))) > 0


def _source_window(top: int, left: int, height: int, width: int, scale: float) -> Window:
    return Window(left / scale, top / scale, width / scale, height / scale)


def resampled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """The grid a scene is staged on when resampled by ``scale`` (staged pixels per source pixel)."""
    return max(1, round(height * scale)), max(1, round(width * scale))
