"""Whole-slide images: open (tiffslide, else OpenSlide), µm/px, the pyramid level to work at, reads.

A slide is read at the pyramid level closest to the model's training µm/px without being coarser than it
(downsampling the remaining factor keeps detail; upsampling a coarse level invents none), and the
remaining factor is resampled while staging. Slide coordinates are level-0 pixels throughout; the
working grid maps to them by ``level_0_per_working_px``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_common.errors import SceneError, UnreadableScene
from pipeline.io import objects

SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"})
# tifffile logs what it finds wrong in a file (a bad page offset) before raising, straight to the terminal;
# the run says it once, in the scene's failure line, and keeps the details in the scene's log
logging.getLogger("tifffile").setLevel(logging.ERROR)
# Probe size when checking that a reader decodes a slide's tiles (JPEG 2000 needs a codec tiffslide may lack).
_PROBE_PX = 16


@dataclass(frozen=True)
class SlideInfo:
    path: Path | str  # a local file, or an object URL
    reader: str  # "tiffslide" or "openslide": whichever decoded it
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, as OpenSlide gives them
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level-0 µm per pixel (x; y assumed equal), None when the file does not say
    vendor: str | None
    objective_power: float | None

    @property
    def levels(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        if self.mpp is None:
            raise SceneError(f"{self.path}: no µm/px in the slide's metadata; pass --mpp")
        return self.mpp * self.level_downsamples[level]


@dataclass(frozen=True)
class SlideGrid:
    """Where the engine works on a slide: a level and the factor resampled from it."""

    level: int
    scale: float  # working pixels per level pixel (<= 1: only ever downsampled)
    working_mpp: float
    shape: tuple[int, int]  # (height, width) of the working grid
    level_0_per_working_px: float


def is_slide(path: Path | str) -> bool:
    """A slide format by suffix, or a TIFF that tiffslide recognises as a slide (e.g. Aperio .tif)."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in {".tif", ".tiff"} or objects.is_object_url(path) or not Path(path).is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            return bool(
                tiff.is_svs or tiff.is_ndpi or tiff.is_scn or tiff.is_philips or tiff.is_bif or tiff.is_ome
            )
    except Exception:
        return False


@contextmanager
def open_slide(path: Path | str, prefer: str | None = None) -> Iterator[Any]:
    """A tiffslide (or OpenSlide) object whose tiles were proven decodable; errors name the file.

    A remote slide (``s3://...``) is read in place by tiffslide over fsspec (served by obstore), range by
    range; OpenSlide reads local files only."""
    remote = objects.is_object_url(path)
    if remote:
        objects.head(str(path))  # no credentials, access denied, no such object: said plainly first
    else:
        path = Path(path)
        if not path.is_file():
            raise UnreadableScene(f"{path}: slide does not exist")
    failures = []
    for reader in ["tiffslide"] if remote else _readers(prefer):
        try:
            slide = _open_with(reader, path)
        except Exception as exc:
            failures.append(f"{reader}: {exc}")
            continue
        try:
            _probe(slide)
        except Exception as exc:
            slide.close()
            failures.append(f"{reader}: cannot decode its tiles ({exc})")
            continue
        try:
            yield slide
        finally:
            slide.close()
        return
    raise UnreadableScene(f"{path}: not a readable slide ({'; '.join(failures)})")


def _readers(prefer: str | None) -> list[str]:
    order = ["tiffslide", "openslide"]
    return sorted(order, key=lambda name: name != prefer) if prefer else order


def _open_with(reader: str, path: Path | str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reader == "tiffslide":
            import tiffslide

            if isinstance(path, str):
                url, storage_options = objects.fsspec_url(path)
                return tiffslide.TiffSlide(url, storage_options=storage_options)
            return tiffslide.TiffSlide(path)
        import openslide

        return openslide.OpenSlide(str(path))


def _probe(slide: Any) -> None:
    """Decode a few pixels at the centre and the far corner of level 0 (truncated files fail here)."""
    width, height = slide.level_dimensions[0]
    for x, y in ((width // 2, height // 2), (width - _PROBE_PX, height - _PROBE_PX)):
        np.asarray(slide.read_region((max(x, 0), max(y, 0)), 0, (_PROBE_PX, _PROBE_PX)))


def describe_slide(path: Path | str, mpp: float | None = None) -> SlideInfo:
    """Levels and µm/px (``mpp`` overrides the metadata; it must be positive)."""
    if mpp is not None and not mpp > 0:
        raise SceneError(f"{path}: --mpp must be positive, got {mpp}")
    with open_slide(path) as slide:
        reader = type(slide).__module__.split(".")[0]
        properties = dict(slide.properties)
        found = _number(properties, "mpp-x")
        return SlideInfo(
            path=path if objects.is_object_url(path) else Path(path),
            reader=reader,
            level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in slide.level_downsamples),
            mpp=mpp if mpp is not None else found,
            vendor=properties.get(f"{reader}.vendor"),
            objective_power=_number(properties, "objective-power"),
        )


def _number(properties: dict[str, Any], name: str) -> float | None:
    for prefix in ("tiffslide", "openslide"):
        value = properties.get(f"{prefix}.{name}")
        if value not in (None, ""):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number) and number > 0:
                return number
    return None


def working_scale(info: SlideInfo, target_mpp: float | None) -> float:
    """Working pixels per level-0 pixel for a model trained at ``target_mpp`` (never above 1)."""
    if target_mpp is None:
        return 1.0
    if not target_mpp > 0:
        raise SceneError(f"{info.path}: the model's µm/px must be positive, got {target_mpp}")
    return min(1.0, info.level_mpp(0) / target_mpp)


def level_for_scale(info: SlideInfo, scale: float) -> tuple[int, float]:
    """The coarsest level still at least as fine as the working grid, and the factor left to resample.

    1% tolerance: rounded metadata must not push a level that matches the target off the list.
    """
    wanted = 1.0 / scale  # level-0 pixels per working pixel
    fine_enough = [lv for lv in range(info.levels) if info.level_downsamples[lv] <= wanted * 1.01]
    level = max(fine_enough, key=lambda lv: info.level_downsamples[lv]) if fine_enough else 0
    return level, min(1.0, info.level_downsamples[level] * scale)


def choose_grid(info: SlideInfo, target_mpp: float | None) -> SlideGrid:
    """The level to read for ``target_mpp`` (None: level 0 as it is) and the working grid it gives."""
    scale = working_scale(info, target_mpp)
    level, level_scale = level_for_scale(info, scale)
    width, height = info.level_dimensions[0]
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return SlideGrid(level, level_scale, info.level_mpp(0) / scale, shape, 1.0 / scale)


def read_working_block(
    slide: Any, info: SlideInfo, scale: float, top: int, left: int, height: int, width: int
) -> np.ndarray:
    """RGB (3, height, width) uint8 on the working grid (``scale`` working px per level-0 px).

    The block's footprint is read once from the level ``level_for_scale`` picks and box-resampled.
    """
    level, level_scale = level_for_scale(info, scale)
    level_width = max(1, math.ceil(width / level_scale))
    level_height = max(1, math.ceil(height / level_scale))
    origin = (round(left / scale), round(top / scale))  # level-0 coordinates, as read_region takes them
    region = slide.read_region(origin, level, (level_width, level_height))
    rgb = _over_white(np.asarray(region.convert("RGBA")))
    if (level_height, level_width) != (height, width):
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BOX))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite on white: OpenSlide gives transparent pixels outside the scanned area."""
    if rgba.shape[2] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)


def thumbnail(slide: Any, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """An RGB thumbnail (h, w, 3) and its level-0 pixels per thumbnail pixel."""
    width, height = slide.level_dimensions[0]
    factor = max(1.0, max(width, height) / max_size)
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    picture = slide.get_thumbnail(size)
    rgb = _over_white(np.asarray(picture.convert("RGBA")))
    return rgb, width / rgb.shape[1]


class SlideBlocks:
    """Blocks of the working grid and their validity (tissue, detected once on a thumbnail)."""

    def __init__(self, slide: Any, info: SlideInfo, scale: float, thumbnail_px: int = 2048) -> None:
        from pipeline.io.tissue import detect_tissue

        self.slide, self.info, self.scale = slide, info, scale
        picture, self.thumb_px = thumbnail(slide, thumbnail_px)  # level-0 pixels per thumbnail pixel
        self.tissue = detect_tissue(picture).mask

    def read_block(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return read_working_block(self.slide, self.info, self.scale, top, left, height, width)

    def read_valid(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Tissue at each working pixel's centre (nearest thumbnail pixel)."""
        per_px = 1.0 / (self.scale * self.thumb_px)  # thumbnail pixels per working pixel
        rows = ((np.arange(top, top + height) + 0.5) * per_px).astype(int).clip(0, self.tissue.shape[0] - 1)
        cols = ((np.arange(left, left + width) + 0.5) * per_px).astype(int).clip(0, self.tissue.shape[1] - 1)
        return np.asarray(self.tissue[np.ix_(rows, cols)])
