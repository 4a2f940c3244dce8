"""Publish a scene's labels: a Cloud-Optimized GeoTIFF mask and a quicklook picture, written atomically."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from PIL import Image, ImageDraw
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from models.atomic import PARTIAL_PREFIX, atomic_output
from models.metadata import ClassInfo
from pipeline.engine.ledger import NODATA_LABEL
from pipeline.engine.workers import CONFIDENCE_SCALE
from pipeline.io.sources import Scene, gdal_env

BLOCK = 512


def write_mask_cog(
    labels: Any, scene: Scene, classes: Sequence[ClassInfo], tags: dict[str, str], out: Path
) -> None:
    """``labels`` (H, W) uint8 class ids, any array that slices (a zarr array streams block rows)."""
    colours = {i: (*c.color, 255) for i, c in enumerate(classes)}
    colours[NODATA_LABEL] = (0, 0, 0, 0)
    write_cog(labels, scene, tags, out, "class id", colours=colours)


def write_confidence_cog(confidence: Any, scene: Scene, tags: dict[str, str], out: Path) -> None:
    """Top-class probability quantised to 0-254 (255 nodata); the band's scale turns it back into 0-1."""
    write_cog(confidence, scene, tags, out, "top-class probability x 254", scale=1 / CONFIDENCE_SCALE)


def write_cog(
    array: Any,
    scene: Scene,
    tags: dict[str, str],
    out: Path,
    description: str,
    colours: dict[int, tuple[int, int, int, int]] | None = None,
    scale: float | None = None,
) -> None:
    """A uint8 (H, W) raster on the scene's grid as a COG: a tiled GTiff streamed first, then the COG."""
    height, width = array.shape
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "uint8",
        "crs": scene.crs,
        "transform": scene.transform,
        "nodata": NODATA_LABEL,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
    }
    with (
        gdal_env(),
        atomic_output(out) as published,
        tempfile.TemporaryDirectory(prefix=f"{PARTIAL_PREFIX}stage-", dir=out.parent) as stage,
    ):
        staged = Path(stage) / "raster.tif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            sink = rasterio.open(staged, "w", **profile)
        with sink:
            for top in range(0, height, BLOCK):
                rows = np.asarray(array[top : top + BLOCK])
                sink.write(rows[None], window=Window(0, top, width, rows.shape[0]))
            if colours:
                sink.write_colormap(1, colours)
            if scale is not None:
                sink.scales = (scale,)
            sink.update_tags(**tags)
            sink.set_band_description(1, description)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            rasterio.shutil.copy(
                staged,
                published,
                driver="COG",
                compress="deflate",
                # class ids and confidences are not averaged: the most frequent value represents a block
                overview_resampling="mode" if colours else "average",
                blocksize=BLOCK,
            )


def to_display(image: np.ndarray) -> np.ndarray:
    """(bands, h, w) of any dtype -> (h, w, 3) uint8: first three bands, 2-98% stretch unless uint8."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(np.moveaxis(rgb, 0, -1))
    values = rgb.astype(np.float32)
    low, high = float(np.percentile(values, 2)), float(np.percentile(values, 98))
    scaled = np.clip((values - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(scaled, 0, -1))


def subsample(array: Any, step: int, block: int = BLOCK) -> np.ndarray:
    """Every ``step``-th pixel of a (..., H, W) array, read a band of rows at a time (bounded memory)."""
    height = array.shape[-2]
    rows = []
    block = max(step, (block // step) * step)
    for top in range(0, height, block):
        part = np.asarray(array[..., top : top + block, :])
        rows.append(part[..., ::step, ::step].copy())  # a view would keep the whole band of rows alive
    return np.concatenate(rows, axis=-2)


def write_quicklook(
    image: Any,
    labels: Any,
    classes: Sequence[ClassInfo],
    out: Path,
    max_size: int = 1024,
    opacity: float = 0.45,
) -> None:
    """The scene with the mask overlaid (nodata left clear) and a legend of class colours."""
    step = max(1, int(np.ceil(max(labels.shape) / max_size)))
    picture = to_display(subsample(image, step)).astype(np.float32)
    small_labels = subsample(labels, step)
    palette = np.array([c.color for c in classes], dtype=np.float32)
    known = small_labels < len(classes)
    picture[known] = (1 - opacity) * picture[known] + opacity * palette[small_labels[known]]
    canvas = Image.fromarray(picture.astype(np.uint8))
    legend_height = 18 * len(classes) + 8
    framed = Image.new("RGB", (max(canvas.width, 180), canvas.height + legend_height), (255, 255, 255))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    for index, info in enumerate(classes):
        y = canvas.height + 4 + 18 * index
        draw.rectangle((6, y, 20, y + 13), fill=tuple(info.color), outline=(0, 0, 0))
        draw.text((26, y), info.name, fill=(0, 0, 0))
    with atomic_output(out) as temp:
        framed.save(temp, format="PNG")
