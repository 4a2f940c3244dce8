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

from deeplab_common.atomic import PARTIAL_PREFIX, atomic_output
from models.metadata import ClassInfo
from pipeline.io.labels import CONFIDENCE_SCALE, NODATA_LABEL
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
    opacity: float = 0.35,
) -> None:
    """The scene with each class's regions tinted and outlined, and a legend: background classes and nodata
    are left clear, and a class whose colour is too close to the image under it (pink stroma on pink H&E)
    is drawn in a contrasting colour instead, named so in the legend."""
    step = max(1, int(np.ceil(max(labels.shape) / max_size)))
    picture = to_display(subsample(image, step)).astype(np.float32)
    small_labels = subsample(labels, step)
    drawn = drawing_colours(picture, small_labels, classes)
    edges = _outlines(small_labels)
    for value, colour in drawn.items():
        region = small_labels == value
        tint = np.asarray(colour, dtype=np.float32)
        picture[region] = (1 - opacity) * picture[region] + opacity * tint
        picture[region & edges] = tint
    canvas = Image.fromarray(picture.astype(np.uint8))
    legend_height = 18 * len(classes) + 8
    framed = Image.new("RGB", (max(canvas.width, 260), canvas.height + legend_height), (255, 255, 255))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    for index, info in enumerate(classes):
        y = canvas.height + 4 + 18 * index
        shown = drawn.get(index)
        if shown is None:
            draw.rectangle((6, y, 20, y + 13), outline=(0, 0, 0))
            label = f"{info.name} (not drawn)"
        else:
            draw.rectangle((6, y, 20, y + 13), fill=shown, outline=(0, 0, 0))
            label = info.name if shown == tuple(info.color) else f"{info.name} (drawn for contrast)"
        draw.text((26, y), label, fill=(0, 0, 0))
    with atomic_output(out) as temp:
        framed.save(temp, format="PNG")


# Saturated colours far apart, for classes whose own colour would vanish into the image under them.
CONTRASTING: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (255, 128, 0),
    (0, 128, 255),
    (255, 0, 0),
)
# A class colour is told apart from the image under it when it is far from it in colour and in lightness too
# (dark blue over dark nuclei differs in hue alone, and hue alone is lost at a quicklook's size).
MIN_CONTRAST = 110.0  # RGB distance
MIN_LIGHTNESS = 50.0  # difference of luma (Rec. 709, 0-255)
LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


def drawing_colours(
    picture: np.ndarray, labels: np.ndarray, classes: Sequence[ClassInfo]
) -> dict[int, tuple[int, int, int]]:
    """Class id -> the colour it is drawn in: its own, unless that is too close to the mean image colour
    under it (in colour or in lightness); then, of the contrasting colours not yet taken, the one farthest
    from that mean among those that differ enough in lightness. Background classes are not drawn."""
    drawn: dict[int, tuple[int, int, int]] = {}
    for value, info in enumerate(classes):
        region = labels == value
        if info.role == "background" or not region.any():
            continue
        under = picture[region].mean(axis=0)
        own = (int(info.color[0]), int(info.color[1]), int(info.color[2]))
        if _stands_out(own, under):
            drawn[value] = own
            continue
        free = [c for c in CONTRASTING if c not in drawn.values()] or list(CONTRASTING)
        lighter_or_darker = [c for c in free if _lightness_apart(c, under)] or free
        drawn[value] = max(lighter_or_darker, key=lambda c: _distance(c, under))
    return drawn


def _distance(colour: tuple[int, int, int], under: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(colour, dtype=np.float32) - under))


def _lightness_apart(colour: tuple[int, int, int], under: np.ndarray) -> bool:
    return abs(float(LUMA @ np.asarray(colour, dtype=np.float32)) - float(LUMA @ under)) >= MIN_LIGHTNESS


def _stands_out(colour: tuple[int, int, int], under: np.ndarray) -> bool:
    return _distance(colour, under) >= MIN_CONTRAST and _lightness_apart(colour, under)


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels on a border between two labels, two pixels wide so they show at the quicklook's size."""
    edge = np.zeros(labels.shape, dtype=bool)
    across = labels[:, 1:] != labels[:, :-1]
    down = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:, :] |= down
    edge[:-1, :] |= down
    return edge
