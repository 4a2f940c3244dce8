"""Ground area of raster pixels in m², for projected and geographic CRSs."""

from __future__ import annotations

import math

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine

AUTHALIC_RADIUS_M = 6_371_007.2  # sphere of the WGS84 ellipsoid's area: < 0.3% error at any latitude


def row_pixel_areas_m2(crs: CRS | None, transform: Affine, height: int) -> np.ndarray | None:
    """Area of one pixel in each row (rows differ in a geographic CRS); None without a CRS."""
    if crs is None or transform.is_identity:
        return None
    if crs.is_geographic:
        if transform.b != 0 or transform.d != 0:
            return None  # a pixel's area then varies along rows and columns: not given, not guessed
        width_rad = math.radians(abs(transform.a))
        edges = np.radians(transform.f + transform.e * np.arange(height + 1))
        band = np.abs(np.sin(edges[:-1]) - np.sin(edges[1:]))
        return np.asarray(AUTHALIC_RADIUS_M**2 * width_rad * band, dtype=np.float64)
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    area = abs(transform.a * transform.e - transform.b * transform.d) * factor**2
    return np.full(height, area, dtype=np.float64)


def class_areas_m2(class_pixels_per_row: np.ndarray, crs: CRS | None, transform: Affine) -> np.ndarray | None:
    """(rows, classes) pixel counts -> area per class in m²."""
    areas = row_pixel_areas_m2(crs, transform, class_pixels_per_row.shape[0])
    if areas is None:
        return None
    return np.asarray(areas @ class_pixels_per_row, dtype=np.float64)
