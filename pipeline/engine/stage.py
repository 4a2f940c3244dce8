"""Stage a scene into chunked zarr stores: ``image.zarr`` (bands, H, W) and ``valid.zarr`` (H, W).

Chunks are the tile cores, so later reads of a core plus halo touch at most nine chunks and writes of one
core never overlap another's. Memory is bounded by one chunk whatever the scene size. The stores are built
under a temporary name and renamed into place, with a marker that records the input's checksum; staging
again with the same input and tile reuses them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from models.atomic import write_text_atomically
from pipeline.io.readers import describe, open_blocks
from pipeline.io.sources import (
    Scene,
    Source,
    resampled_shape,
    source_sha256,
)

MARKER = "staged.json"


@dataclass(frozen=True)
class StagedScene:
    scene: Scene
    folder: Path
    tile: int
    checksum: str
    scale: float = 1.0  # staged pixels per source pixel (--match-resolution)

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
    path: Source | Scene, work_dir: Path | str, tile: int, checksum: str | None = None, scale: float = 1.0
) -> StagedScene:
    """Stage ``path`` (or an already described scene, e.g. a slide with its --mpp) on the grid ``scale``."""
    scene = path if isinstance(path, Scene) else describe(path)
    path = scene.path
    checksum = checksum or source_sha256(path)
    folder = Path(work_dir) / scene.scene_id
    staged = StagedScene(scene, folder, tile, checksum, scale)
    height_px, width_px = staged.shape
    attributes: dict[str, Any] = {"source": str(path), "checksum": checksum, "tile": tile, "scale": scale}
    if _is_current(folder, attributes):
        return staged
    partial = folder / ".staging"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    image = zarr.create_array(
        store=partial / "image.zarr",
        shape=(scene.bands, height_px, width_px),
        chunks=(scene.bands, tile, tile),
        dtype=scene.dtype,
        attributes=attributes,
    )
    valid = zarr.create_array(
        store=partial / "valid.zarr",
        shape=(height_px, width_px),
        chunks=(tile, tile),
        dtype="bool",
        attributes=attributes,
    )
    with open_blocks(scene, scale) as blocks:
        for top in range(0, height_px, tile):
            for left in range(0, width_px, tile):
                height, width = min(tile, height_px - top), min(tile, width_px - left)
                image[:, top : top + height, left : left + width] = blocks.read_block(
                    top, left, height, width
                )
                valid[top : top + height, left : left + width] = blocks.read_valid(top, left, height, width)
    for name in ("image.zarr", "valid.zarr"):
        shutil.rmtree(folder / name, ignore_errors=True)
        (partial / name).rename(folder / name)
    shutil.rmtree(partial, ignore_errors=True)
    write_text_atomically(folder / MARKER, json.dumps(attributes | {"shape": [height_px, width_px]}))
    return staged


def _is_current(folder: Path, attributes: dict[str, Any]) -> bool:
    marker = folder / MARKER
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    complete = (folder / "image.zarr").exists() and (folder / "valid.zarr").exists()
    return complete and all(recorded.get(k) == v for k, v in attributes.items() if k != "source")


def count_valid(staged: StagedScene) -> int:
    valid = staged.valid()
    return int(
        sum(np.count_nonzero(valid[top : top + staged.tile]) for top in range(0, valid.shape[0], staged.tile))
    )
