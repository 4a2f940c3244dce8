"""Results on a resampled grid (``--match-resolution``) seen on the source's grid, read by bands of rows.

The scene is staged at the model's pixel size; the published rasters keep the source's CRS, transform and
shape exactly, so labels are taken back by nearest neighbour (class ids must not be interpolated).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NearestView:
    """A (H, W) view of a (h, w) array ``scale`` times finer (or coarser); supports ``view[a:b]`` only."""

    def __init__(self, array: Any, shape: tuple[int, int], scale: float) -> None:
        self.array = array
        self.shape = shape
        self.scale = scale
        staged_h, staged_w = array.shape
        self._cols = _nearest(shape[1], scale, staged_w)
        self._staged_h = staged_h

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NearestView supports contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        wanted = _nearest(self.shape[0], self.scale, self._staged_h)[start:stop]
        if wanted.size == 0:
            return np.zeros((0, self.shape[1]), dtype=np.uint8)
        block = np.asarray(self.array[int(wanted[0]) : int(wanted[-1]) + 1])
        return block[wanted - wanted[0]][:, self._cols]


def _nearest(count: int, scale: float, limit: int) -> np.ndarray:
    """Index on the staged grid of the pixel containing each source pixel's centre."""
    return np.minimum(np.floor((np.arange(count) + 0.5) * scale).astype(np.int64), limit - 1)
