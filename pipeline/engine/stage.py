"""Stage a scene into chunked zarr stores: ``image.zarr`` (bands, H, W) and ``valid.zarr`` (H, W).

Chunks are the tile cores, so later reads of a core plus halo touch at most nine chunks and writes of one
core never overlap another's. Memory is bounded by one chunk whatever the scene size. The stores are built
under a temporary name and renamed into place, with a marker that records the input's identity; staging
again with the same input and tile reuses them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from deeplab_common import faults
from deeplab_common.atomic import PARTIAL_PREFIX, replace_durably, write_text_atomically
from pipeline.io.readers import describe, open_blocks
from pipeline.io.sources import (
    Scene,
    Source,
    resampled_shape,
    source_identity,
)

MARKER = "staged.json"


@dataclass(frozen=True, kw_only=True)
class StagedStores:
    scene: Scene
    folder: Path
    tile: int
    input_identity: str  # sources.source_identity
    scale: float = 1.0  # staged pixels per source pixel (--match-resolution)
    nonfinite: int = 0  # pixels with a NaN or infinite sample, staged as nodata

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the staged grid: the source's unless resampled."""
        return resampled_shape(self.scene.height, self.scene.width, self.scale)

    @property
    def image_path(self) -> Path:
        return self.folder / "image.zarr"

    @property
    def valid_path(self) -> Path:
        return self.folder / "valid.zarr"

    def image(self) -> Any:
        return self.open_image(self.folder)

    @staticmethod
    def open_image(folder: Path) -> Any:
        """The staged (bands, H, W) store of a scene folder under ``.work``."""
        return zarr.open_array(folder / "image.zarr", mode="r")

    def valid(self) -> Any:
        return self.open_valid(self.folder)

    @staticmethod
    def open_valid(folder: Path) -> Any:
        """The staged (H, W) valid-pixel store of a scene folder under ``.work``."""
        return zarr.open_array(folder / "valid.zarr", mode="r")


def stage_scene(
    path: Source | Scene,
    work_dir: Path | str,
    tile: int,
    input_identity: str | None = None,
    scale: float = 1.0,
) -> StagedStores:
    """Stage ``path`` (or an already described scene, e.g. a slide with its --mpp) on the grid ``scale``."""
    scene = path if isinstance(path, Scene) else describe(path)
    path = scene.path
    input_identity = input_identity or source_identity(path)
    folder = Path(work_dir) / scene.scene_id
    staged = StagedStores(scene=scene, folder=folder, tile=tile, input_identity=input_identity, scale=scale)
    height_px, width_px = staged.shape
    attributes: dict[str, Any] = {
        "source": str(path),
        "input": input_identity,
        "tile": tile,
        "scale": scale,
    }
    recorded = _current_marker(folder, attributes)
    if recorded is not None:
        return replace(staged, nonfinite=int(recorded.get("nonfinite", 0)))
    partial = folder / f"{PARTIAL_PREFIX}staging"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    image = zarr.create_array(
        store=partial / "image.zarr",
        shape=(scene.bands, height_px, width_px),
        chunks=(scene.bands, min(tile, height_px), min(tile, width_px)),
        dtype=scene.dtype,
        attributes=attributes,
    )
    valid = zarr.create_array(
        store=partial / "valid.zarr",
        shape=(height_px, width_px),
        chunks=(min(tile, height_px), min(tile, width_px)),
        dtype="bool",
        attributes=attributes,
    )
    try:
        nonfinite = _copy_blocks(scene, scale, tile, image, valid)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-staged is left behind
        raise
    for name in ("image.zarr", "valid.zarr"):  # flushed before the marker that vouches for them
        replace_durably(partial / name, folder / name)
    shutil.rmtree(partial, ignore_errors=True)
    marker = attributes | {"shape": [height_px, width_px], "nonfinite": nonfinite}
    write_text_atomically(folder / MARKER, json.dumps(marker))
    return replace(staged, nonfinite=nonfinite)


def _copy_blocks(scene: Scene, scale: float, tile: int, image: Any, valid: Any) -> int:
    """The scene's bands and valid mask into the stores, a core at a time; returns how many pixels were
    made nodata for NaN or infinite samples."""
    height_px, width_px = valid.shape
    nonfinite = 0
    with open_blocks(scene, scale) as blocks:
        for top in range(0, height_px, tile):
            for left in range(0, width_px, tile):
                height, width = min(tile, height_px - top), min(tile, width_px - left)
                block = blocks.read_block(top, left, height, width)
                block_valid = blocks.read_valid(top, left, height, width)
                nonfinite += finite_only(block, block_valid)
                image[:, top : top + height, left : left + width] = block
                valid[top : top + height, left : left + width] = block_valid
                faults.passing("stage-block")
    return nonfinite


def finite_only(block: np.ndarray, valid: np.ndarray) -> int:
    """Make pixels with a NaN or infinite sample nodata, in place (their samples become 0, which the model
    and the CRF can take, and ``valid`` False); returns how many valid pixels that took away. A model fed
    one NaN returns NaN for its whole window, so such pixels cannot be computed, only left out."""
    if not np.issubdtype(block.dtype, np.floating):
        return 0
    bad = ~np.isfinite(block).all(axis=0)
    if not bad.any():
        return 0
    taken = int(np.count_nonzero(bad & valid))
    block[:, bad] = 0
    valid[bad] = False
    return taken


def _current_marker(folder: Path, attributes: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a complete staging of the same input on the same grid, else None."""
    marker = folder / MARKER
    if not marker.exists():
        return None
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    complete = (folder / "image.zarr").exists() and (folder / "valid.zarr").exists()
    same = all(recorded.get(k) == v for k, v in attributes.items() if k != "source")
    return recorded if complete and same else None


def count_valid(staged: StagedStores) -> int:
    valid = staged.valid()
    return int(
        sum(np.count_nonzero(valid[top : top + staged.tile]) for top in range(0, valid.shape[0], staged.tile))
    )
