"""What a scene needs on the disk under ``--out`` (staging, resume state, outputs), checked against what is
free before it is staged: a full disk found mid-run fails the scene late and can starve the others; and what
one model call needs in memory, checked against the machine's before any scene (``--tile 100000``).

The estimate is an upper bound: the uncompressed bytes of the staged bands, the valid mask, the label (and
confidence) planes and the published rasters with their overviews. Compression usually leaves much of it
unused; a sparse file that claims a huge grid is exactly what it must catch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from deeplab_common.errors import ConfigError, OutOfSpace
from models.metadata import CheckpointMetadata
from pipeline.engine.grid import resolve_tiling
from pipeline.engine.outdir import WORK_NAME
from pipeline.io.sources import Source, source_id

OVERVIEW_SHARE = 4 / 3  # a raster with its 2x overviews holds at most 4/3 of its pixels


def bytes_needed(shape: tuple[int, int], bands: int, dtype: str, probabilities: bool) -> int:
    """Upper bound of what staging, computing and publishing a scene of ``shape`` writes."""
    height, width = shape
    pixels = height * width
    planes = 2 if probabilities else 1  # labels, and the top-class confidence when kept
    staged = pixels * bands * np.dtype(dtype).itemsize + pixels  # + the valid mask
    return int(staged + pixels * planes * (1 + OVERVIEW_SHARE))


def bytes_free(folder: Path) -> int:
    """Free bytes (for this user) on the file system that holds ``folder`` or, before it exists, its
    nearest existing parent."""
    place = Path(folder)
    while not place.exists() and place.parent != place:
        place = place.parent
    return int(shutil.disk_usage(place).free)


def bytes_used(folder: Path) -> int:
    """What an earlier, interrupted run already wrote for the scene (counted as available again)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def check_fits(
    source: Source, shape: tuple[int, int], bands: int, dtype: str, out_dir: Path, probabilities: bool
) -> None:
    """Raise, naming the file and both sizes, when a scene of ``shape`` cannot fit under ``out_dir``. Called
    in preflight as soon as the grid is known (a grid of 10^10 pixels is refused before it is tiled) and
    again right before staging."""
    work = Path(out_dir) / WORK_NAME / source_id(source)
    needed = bytes_needed(shape, bands, dtype, probabilities) - bytes_used(work)
    free = bytes_free(out_dir)
    if needed > free:
        height, width = shape
        raise OutOfSpace(
            f"{source}: needs up to {_size(needed)} under {out_dir} to stage and publish its "
            f"{width}x{height} pixels, but {_size(free)} is free: refused before staging"
        )


# floats held per window pixel at least: the bands in, and per class the logits, their fused copy and the
# probabilities (the model's own feature maps come on top: the bound is low on purpose)
LOGIT_COPIES = 3


def window_memory(tile: int, cores_per_window: int, bands: int, classes: int, batch_size: int) -> int:
    """A lower bound of the bytes one model call holds: ``batch_size`` windows of at least their cores."""
    side = tile * cores_per_window
    return batch_size * side * side * (bands + LOGIT_COPIES * classes) * 4


def machine_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_window_memory(
    metadata: CheckpointMetadata, tile: int | None, cores_per_window: int | None, batch_size: int
) -> None:
    """Refuse a tiling whose model calls cannot fit this machine's memory: a usage error before any scene
    is read, not a ``MemoryError`` once one is staged."""
    tiling = resolve_tiling(metadata, tile, cores_per_window)
    needed = window_memory(
        tiling.tile, tiling.cores_per_window, metadata.num_bands, metadata.num_classes, batch_size
    )
    if needed > (memory := machine_memory()):
        side = tiling.tile * tiling.cores_per_window
        raise ConfigError(
            f"--tile {tiling.tile}: one model call holds {batch_size} window(s) of at least {side}x{side} px "
            f"({metadata.num_bands} bands, {metadata.num_classes} classes), over {_size(needed)} of memory, "
            f"but this machine has {_size(memory)}: use a smaller --tile, --cores-per-window or --batch-size"
        )


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")
