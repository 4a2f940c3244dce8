"""Publish a slide's mask: a tiled, pyramidal OME-TIFF at the working µm/px (tiffslide and QuPath open it),
and optionally OME-Zarr (NGFF 0.5, zarr v3): the slide at the same µm/px with the mask as its label image.

Level 0 is the label grid itself; each further level halves it by a 2x2 mode (classes are never blended)
until it fits in one tile. Every level is built into a chunked zarr store from the one above and streamed
into the TIFF tile by tile, so memory stays at a few tiles whatever the slide's size. The file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from deeplab_common.atomic import atomic_output, partial_name, replace_durably
from models.metadata import ClassInfo
from pipeline.io.labels import NODATA_LABEL

OME_TILE = 512
NGFF_VERSION = "0.5"


def mode_2x2(block: np.ndarray) -> np.ndarray:
    """Each 2x2 cell's most frequent value (ties: the top-left one's); odd edges keep their last row/col."""
    height, width = block.shape
    padded = np.pad(block, ((0, height % 2), (0, width % 2)), mode="edge")
    cells = np.stack([padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]])
    votes = (cells[:, None] == cells[None, :]).sum(axis=1)
    best = votes.argmax(axis=0)
    return np.take_along_axis(cells, best[None], axis=0)[0]


def _halve(source: Any, folder: Path, index: int, tile: int) -> Any:
    """The next level of ``source`` in a zarr store (built a tile at a time)."""
    return _halve_into(source, folder / f"level-{index}.zarr", tile)


def _halve_into(source: Any, store: Any, tile: int, dimensions: tuple[str, ...] | None = None) -> Any:
    height, width = source.shape
    target = zarr.create_array(
        store=store,
        shape=((height + 1) // 2, (width + 1) // 2),
        chunks=(tile, tile),
        dtype=source.dtype,
        fill_value=NODATA_LABEL,
        dimension_names=dimensions,
    )
    for top in range(0, height, 2 * tile):
        for left in range(0, width, 2 * tile):
            block = np.asarray(source[top : top + 2 * tile, left : left + 2 * tile])
            halved = mode_2x2(block)
            target[top // 2 : top // 2 + halved.shape[0], left // 2 : left // 2 + halved.shape[1]] = halved
    return target


def _tiles(level: Any, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles, the edge ones padded to a full tile (as TIFF tiles are)."""
    height, width = level.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = np.asarray(level[top : top + tile, left : left + tile])
            full = np.full((tile, tile), NODATA_LABEL, dtype=block.dtype)
            full[: block.shape[0], : block.shape[1]] = block
            yield full


def write_ome_pyramid(
    labels: Any,
    mpp: float,
    out: Path,
    scratch: Path,
    name: str,
    tile: int = OME_TILE,
) -> list[tuple[int, int]]:
    """``labels`` (H, W, uint8) -> pyramidal OME-TIFF, PhysicalSize ``mpp`` µm; returns (h, w) per level."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    levels = [labels]
    while max(levels[-1].shape) > tile:
        levels.append(_halve(levels[-1], scratch, len(levels), tile))
    metadata = {
        "axes": "YX",
        "Name": name,
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    try:
        with atomic_output(out) as temp, tifffile.TiffWriter(temp, bigtiff=True, ome=True) as tiff:
            for index, level in enumerate(levels):
                factor = 2**index
                tiff.write(
                    _tiles(level, tile),
                    shape=level.shape,
                    subifds=len(levels) - 1 if index == 0 else None,
                    subfiletype=1 if index else 0,
                    resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)),
                    resolutionunit="CENTIMETER",
                    metadata=metadata if index == 0 else None,
                    tile=(tile, tile),
                    compression="zlib",
                    dtype=np.uint8,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [(int(level.shape[0]), int(level.shape[1])) for level in levels]


def write_ome_zarr(
    image: Any,
    labels: Any,
    mpp: float,
    out: Path,
    name: str,
    classes: Sequence[ClassInfo],
    tile: int = OME_TILE,
) -> list[tuple[int, int]]:
    """The slide at the working µm/px with its mask as the label image ``labels/mask`` (NGFF 0.5, zarr v3):
    napari (napari-ome-zarr) and other NGFF viewers show the mask over the tissue, with the classes' colours
    and names. ``image`` is (bands, H, W) uint8 on the mask's grid. Built beside ``out``, then renamed in."""
    partial = partial_name(out)
    shutil.rmtree(partial, ignore_errors=True)
    root = zarr.create_group(store=partial, zarr_format=3)
    image_levels = [_level(partial / "0", image, tile, ("c", "y", "x"))]
    label_levels = [_level(partial / "labels" / "mask" / "0", labels, tile, ("y", "x"))]
    while max(label_levels[-1].shape) > tile:
        index = len(label_levels)
        image_levels.append(_halve_image(image_levels[-1], partial / str(index), tile))
        label_levels.append(
            _halve_into(label_levels[-1], partial / "labels" / "mask" / str(index), tile, ("y", "x"))
        )
    space = [{"name": axis, "type": "space", "unit": "micrometer"} for axis in ("y", "x")]
    root.attrs["ome"] = {
        "version": NGFF_VERSION,
        "multiscales": [
            _multiscale(name, [{"name": "c", "type": "channel"}, *space], mpp, len(image_levels))
        ],
        "omero": {
            "channels": [
                {"label": band, "color": colour, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for band, colour in zip(
                    ("red", "green", "blue"), ("FF0000", "00FF00", "0000FF"), strict=False
                )
            ][: image.shape[0]],
            "rdefs": {"model": "color"},
        },
    }
    labels_group = zarr.open_group(store=partial / "labels", zarr_format=3, mode="a")
    labels_group.attrs["ome"] = {"version": NGFF_VERSION, "labels": ["mask"]}
    label = zarr.open_group(store=partial / "labels" / "mask", zarr_format=3, mode="a")
    label.attrs["ome"] = {
        "version": NGFF_VERSION,
        "multiscales": [_multiscale(f"{name} classes", space, mpp, len(label_levels))],
        "image-label": {
            "version": NGFF_VERSION,
            "colors": [{"label-value": v, "rgba": [*c.color, 255]} for v, c in enumerate(classes)]
            + [{"label-value": NODATA_LABEL, "rgba": [0, 0, 0, 0]}],
            "properties": [{"label-value": v, "class": c.name, "role": c.role} for v, c in enumerate(classes)]
            + [{"label-value": NODATA_LABEL, "class": "nodata", "role": "nodata"}],
            "source": {"image": "../../"},
        },
    }
    replace_durably(partial, out)
    return [(int(level.shape[0]), int(level.shape[1])) for level in label_levels]


def _multiscale(name: str, axes: list[dict[str, str]], mpp: float, levels: int) -> dict[str, Any]:
    leading = [1.0] * (len(axes) - 2)  # channels are not scaled
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [{"type": "scale", "scale": [*leading, mpp * 2**i, mpp * 2**i]}],
        }
        for i in range(levels)
    ]
    return {"name": name, "axes": axes, "datasets": datasets}


def _level(store: Path, source: Any, tile: int, dimensions: tuple[str, ...]) -> Any:
    """``source`` copied into a chunked array at ``store``, a band of rows at a time."""
    chunks = (source.shape[0], tile, tile) if len(dimensions) == 3 else (tile, tile)
    target = zarr.create_array(
        store=store,
        shape=source.shape,
        chunks=chunks,
        dtype=np.uint8,
        fill_value=NODATA_LABEL if len(dimensions) == 2 else 0,
        dimension_names=dimensions,
    )
    for top in range(0, source.shape[-2], tile):
        target[..., top : top + tile, :] = np.asarray(source[..., top : top + tile, :])
    return target


def _halve_image(source: Any, store: Path, tile: int) -> Any:
    """The next level of a (bands, H, W) image: each 2x2 cell's mean (odd edges repeat their last row/col)."""
    bands, height, width = source.shape
    target = zarr.create_array(
        store=store,
        shape=(bands, (height + 1) // 2, (width + 1) // 2),
        chunks=(bands, tile, tile),
        dtype=np.uint8,
        fill_value=0,
        dimension_names=("c", "y", "x"),
    )
    for top in range(0, height, 2 * tile):
        block = np.asarray(source[:, top : top + 2 * tile, :]).astype(np.float32)
        rows, cols = block.shape[1], block.shape[2]
        padded = np.pad(block, ((0, 0), (0, rows % 2), (0, cols % 2)), mode="edge")
        halved = padded.reshape(bands, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2).mean(axis=(2, 4))
        target[:, top // 2 : top // 2 + halved.shape[1], :] = np.round(halved).astype(np.uint8)
    return target
