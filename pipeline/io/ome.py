"""Publish a slide's mask: a tiled, pyramidal OME-TIFF at the working µm/px (tiffslide and QuPath open it),
and optionally an OME-Zarr multiscale image (NGFF 0.5: zarr v3, the same levels).

Level 0 is the label grid itself; each further level halves it by a 2x2 mode (classes are never blended)
until it fits in one tile. Every level is built into a chunked zarr store from the one above and streamed
into the TIFF tile by tile, so memory stays at a few tiles whatever the slide's size. The file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from models.atomic import atomic_output, partial_name, replace_durably
from pipeline.engine.ledger import NODATA_LABEL

OME_TILE = 512


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


def _halve_into(source: Any, store: Any, tile: int) -> Any:
    height, width = source.shape
    target = zarr.create_array(
        store=store,
        shape=((height + 1) // 2, (width + 1) // 2),
        chunks=(tile, tile),
        dtype=source.dtype,
        fill_value=NODATA_LABEL,
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
    labels: Any, mpp: float, out: Path, name: str, tile: int = OME_TILE
) -> list[tuple[int, int]]:
    """``labels`` -> an OME-Zarr (NGFF 0.5) multiscale group at ``out``; built beside it, then renamed in."""
    partial = partial_name(out)
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.create_group(store=partial, zarr_format=3)
    level = zarr.create_array(
        store=partial / "0", shape=labels.shape, chunks=(tile, tile), dtype=np.uint8, fill_value=NODATA_LABEL
    )
    for top in range(0, labels.shape[0], tile):
        level[top : top + tile] = np.asarray(labels[top : top + tile])
    levels = [level]
    while max(levels[-1].shape) > tile:
        levels.append(_halve_into(levels[-1], partial / str(len(levels)), tile))
    datasets = [
        {"path": str(index), "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**index] * 2}]}
        for index in range(len(levels))
    ]
    axes = [{"name": axis, "type": "space", "unit": "micrometer"} for axis in ("y", "x")]
    multiscale: dict[str, Any] = {"name": name, "axes": axes, "datasets": datasets}
    group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    replace_durably(partial, out)
    return [(int(level.shape[0]), int(level.shape[1])) for level in levels]
