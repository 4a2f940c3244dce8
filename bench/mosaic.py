"""The real scene mirrored edge to edge to any size: the benchmarks' large scenes (no I/O, NumPy only)."""

from __future__ import annotations

import numpy as np


def mirrored_index(start: int, stop: int, period: int) -> np.ndarray:
    """Source indices of positions ``start..stop`` when a length-``period`` axis is repeated, every other
    copy reversed (so neighbouring copies meet edge to edge)."""
    positions = np.arange(start, stop)
    offset = positions % period
    return np.where((positions // period) % 2 == 1, period - 1 - offset, offset)


def mirrored(image: np.ndarray, top: int, height: int, size: int) -> np.ndarray:
    """Rows ``top..top+height`` of the size x size mirror mosaic of ``image`` (bands, H, W)."""
    rows = mirrored_index(top, min(top + height, size), image.shape[1])
    cols = mirrored_index(0, size, image.shape[2])
    return np.ascontiguousarray(image[:, rows][:, :, cols])
