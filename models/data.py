"""Image/mask pairs for training and evaluation: discovery, pairing by file stem, validated reading.

Every format goes through GDAL (rasterio): GeoTIFF, PNG and JPEG alike.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.transform import Affine

from deeplab_common.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


def list_files(spec: str | Path, what: str) -> list[Path]:
    """A folder (its image files), a glob pattern, or one file."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{text}: {what} path does not exist")
    if not files:
        raise DataError(f"{text}: no {what} files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def pair_by_stem(images: list[Path], masks: list[Path]) -> list[Pair]:
    """Pair images with masks of the same file stem; an image without a mask is an error."""
    masks_by_stem: dict[str, Path] = {}
    for mask in masks:
        if mask.stem in masks_by_stem:
            raise DataError(f"{mask}: two masks share the stem {mask.stem!r} ({masks_by_stem[mask.stem]})")
        masks_by_stem[mask.stem] = mask
    pairs = []
    for image in images:
        found = masks_by_stem.get(image.stem)
        if found is None:
            raise DataError(f"{image}: no mask with the stem {image.stem!r}")
        pairs.append(Pair(image.stem, image, found))
    return pairs


def pairs_from_folders(images: str | Path, masks: str | Path) -> list[Pair]:
    return pair_by_stem(list_files(images, "image"), list_files(masks, "mask"))


def pairs_from_csv(csv_path: str | Path) -> list[Pair]:
    """CSV with a header; the first two columns are image and mask paths (relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV listing does not exist")
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise DataError(f"{csv_path}: expected a header and rows of at least two columns (image, mask)")
    pairs = []
    for line_number, row in enumerate(rows[1:], start=2):
        image, mask = (csv_path.parent / row[0].strip(), csv_path.parent / row[1].strip())
        for path in (image, mask):
            if not path.is_file():
                raise DataError(f"{csv_path}:{line_number}: {path} does not exist")
        pairs.append(Pair(image.stem, image, mask))
    return pairs


def split_pairs(
    pairs: list[Pair],
    val_list: Path | None = None,
    val_patterns: list[str] | None = None,
    val_bbox: tuple[float, float, float, float] | None = None,
) -> tuple[list[Pair], list[Pair]]:
    """Split into (train, val): by a file of stems, by glob patterns on stems, or by ground area."""
    chosen: set[str] = set()
    if val_list is not None:
        if not Path(val_list).is_file():
            raise DataError(f"{val_list}: validation list does not exist")
        names = [line.strip() for line in Path(val_list).read_text().splitlines()]
        wanted = {Path(name).stem for name in names if name and not name.startswith("#")}
        unknown = wanted - {p.stem for p in pairs}
        if unknown:
            raise DataError(f"{val_list}: names not among the pairs: {sorted(unknown)[:5]}")
        chosen |= wanted
    for pattern in val_patterns or []:
        chosen |= {p.stem for p in pairs if fnmatch.fnmatch(p.stem, pattern)}
    if val_bbox is not None:
        chosen |= {p.stem for p in pairs if _centre_inside(p.image, val_bbox)}
    train = [p for p in pairs if p.stem not in chosen]
    val = [p for p in pairs if p.stem in chosen]
    return train, val


def _centre_inside(path: Path, bbox: tuple[float, float, float, float]) -> bool:
    with _open(path) as dataset:
        if dataset.crs is None:
            raise DataError(f"{path}: not georeferenced, cannot split by ground area")
        left, bottom, right, top = dataset.bounds
    x, y = (left + right) / 2, (bottom + top) / 2
    return bbox[0] <= x <= bbox[2] and bbox[1] <= y <= bbox[3]


def _open(path: Path) -> rasterio.io.DatasetReader:
    if not Path(path).exists():
        raise DataError(f"{path}: file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: not a readable raster ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    """All bands as (bands, height, width) in the file's dtype."""
    with _open(path) as dataset, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return np.asarray(dataset.read())


def read_mask(path: Path, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """A single-band integer class mask; values beyond the declared classes are an error."""
    with _open(path) as dataset, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if dataset.count != 1:
            raise DataError(f"{path}: a mask must have one band, this one has {dataset.count}")
        if not np.issubdtype(np.dtype(dataset.dtypes[0]), np.integer):
            raise DataError(f"{path}: a mask must hold integer class ids, not {dataset.dtypes[0]}")
        mask = np.asarray(dataset.read(1)).astype(np.int64)
    valid = mask if ignore_index is None else mask[mask != ignore_index]
    if valid.size and (valid.max() >= num_classes or valid.min() < 0):
        bad = sorted({int(v) for v in np.unique(valid) if v >= num_classes or v < 0})
        raise DataError(
            f"{path}: mask values {bad[:5]} outside the {num_classes} declared classes "
            f"(0..{num_classes - 1}{'' if ignore_index is None else f', ignore {ignore_index}'})"
        )
    return mask


def read_pair(pair: Pair, num_classes: int, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(pair.image)
    mask = read_mask(pair.mask, num_classes, ignore_index)
    if image.shape[1:] != mask.shape:
        raise DataError(
            f"{pair.image}: image is {image.shape[2]}x{image.shape[1]} but its mask {pair.mask} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    return image, mask


def raster_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the header."""
    with _open(path) as dataset:
        return dataset.height, dataset.width


def pixel_size_m(path: Path) -> float | None:
    """Ground sample distance in metres of a raster file, or None when it is not georeferenced."""
    with _open(path) as dataset:
        return ground_pixel_size(dataset.crs, dataset.transform, dataset.height, dataset.width)


def ground_pixel_size(crs: CRS | None, transform: Affine, height: int, width: int) -> float | None:
    """Pixel width in metres; a geographic CRS is converted at the raster's centre latitude."""
    if crs is None or transform.is_identity:
        return None
    res_x = math.hypot(transform.a, transform.d)
    if crs.is_geographic:
        latitude = (transform @ (width / 2, height / 2))[1]
        return float(res_x * 111_320.0 * math.cos(math.radians(latitude)))
    return float(res_x * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0))
