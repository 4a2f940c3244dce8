"""The tile grid: non-overlapping cores that cover the scene, each read with a halo of context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.metadata import CheckpointMetadata


@dataclass(frozen=True)
class Tile:
    """A core (the pixels this tile writes) inside a window (the pixels the model sees), scene coordinates."""

    row: int
    col: int
    core_top: int
    core_left: int
    core_height: int
    core_width: int
    halo: int

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of core + halo; may extend past the scene (padded by reflection)."""
        return (
            self.core_top - self.halo,
            self.core_left - self.halo,
            self.core_height + 2 * self.halo,
            self.core_width + 2 * self.halo,
        )


HALO_ALIGN = 32  # a multiple of every output stride: tiles sample the feature grid in phase with the scene


def default_halo(receptive_radius: int, crf_sigma_alpha: float | None, tile: int) -> int:
    """Context around each core: the model's receptive field and 3 σα of the CRF's appearance kernel.

    Capped at half the core (a window of two cores a side): deep backbones' theoretical fields (500-900 px)
    far exceed the context that sways a prediction, and past the cap the extra context costs more than it
    changes. Measured on the Kampala scene (bench/seams.py), border excess against a half-core-shifted
    tiling: 0.93 points at 64 px, 0.48 at 256 px.
    """
    crf_reach = math.ceil(3 * crf_sigma_alpha) if crf_sigma_alpha else 0
    needed = -(-max(receptive_radius, crf_reach) // HALO_ALIGN) * HALO_ALIGN
    cap = tile // 2 // HALO_ALIGN * HALO_ALIGN
    return max(HALO_ALIGN, min(needed, cap))


def model_halo(metadata: CheckpointMetadata, crf_sigma_alpha: float | None, tile: int) -> int:
    """``default_halo`` for a checkpoint's architecture (the one place that asks for its receptive field)."""
    # here, not at the top: it builds the model (torch), and the CRF actors import this module
    from models.receptive_field import receptive_radius

    arch_args = tuple(sorted(metadata.arch_args.items()))
    return default_halo(receptive_radius(metadata.architecture, arch_args), crf_sigma_alpha, tile)


def plan_tiles(height: int, width: int, tile: int, halo: int) -> list[Tile]:
    if tile < 16 or halo < 0:
        raise ValueError(f"tile must be >= 16 and halo >= 0 (got {tile}, {halo})")
    return [
        Tile(r, c, top, left, min(tile, height - top), min(tile, width - left), halo)
        for r, top in enumerate(range(0, height, tile))
        for c, left in enumerate(range(0, width, tile))
    ]


def read_padded(source: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's window from a (bands, H, W) array, reflected where it overhangs the scene."""
    top, left, height, width = tile.window
    scene_h, scene_w = source.shape[-2:]
    inner = source[..., max(top, 0) : min(top + height, scene_h), max(left, 0) : min(left + width, scene_w)]
    return pad_reflect(
        inner, (max(0, -top), max(0, top + height - scene_h)), (max(0, -left), max(0, left + width - scene_w))
    )


def pad_reflect(array: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Reflect-pad the last two axes; repeats reflection when the pad exceeds the array (tiny scenes)."""
    while rows[0] or rows[1] or cols[0] or cols[1]:
        h, w = array.shape[-2:]
        step_rows = (min(rows[0], h - 1), min(rows[1], h - 1)) if h > 1 else rows
        step_cols = (min(cols[0], w - 1), min(cols[1], w - 1)) if w > 1 else cols
        mode: Literal["reflect", "edge"] = "reflect" if h > 1 and w > 1 else "edge"
        widths = [(0, 0)] * (array.ndim - 2) + [step_rows, step_cols]
        array = np.pad(array, widths, mode=mode)
        rows = (rows[0] - step_rows[0], rows[1] - step_rows[1])
        cols = (cols[0] - step_cols[0], cols[1] - step_cols[1])
    return array


def core_of(window_array: np.ndarray, tile: Tile) -> np.ndarray:
    """Crop a window-sized array (…, H, W) back to the tile's core."""
    return window_array[
        ..., tile.halo : tile.halo + tile.core_height, tile.halo : tile.halo + tile.core_width
    ]
