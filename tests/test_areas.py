from __future__ import annotations

import math

import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.io.areas import class_areas_m2, row_pixel_areas_m2


def test_projected_pixel_area() -> None:
    areas = row_pixel_areas_m2(CRS.from_epsg(32618), from_origin(0, 0, 30, 30), 4)
    assert areas is not None and (areas == 900).all()


def test_geographic_area_of_one_degree_at_the_equator() -> None:
    # 1°x1° cell at the equator: ~12,364 km² on the WGS84 ellipsoid (independent figure).
    areas = row_pixel_areas_m2(CRS.from_epsg(4326), from_origin(32.0, 1.0, 1.0, 1.0), 1)
    assert areas is not None
    assert areas[0] == pytest.approx(12_364e6, rel=0.01)


def test_geographic_areas_shrink_with_latitude() -> None:
    transform = from_origin(0.0, 60.0, 0.001, 0.001)
    areas = row_pixel_areas_m2(CRS.from_epsg(4326), transform, 2)
    assert areas is not None
    expected = (0.001 * 111_320) ** 2 * math.cos(math.radians(60))
    assert areas[0] == pytest.approx(expected, rel=0.01)


def test_class_areas_and_no_crs() -> None:
    counts = np.array([[2, 1], [0, 3]])
    areas = class_areas_m2(counts, CRS.from_epsg(32618), from_origin(0, 0, 10, 10))
    assert areas is not None and list(areas) == [200.0, 400.0]
    assert class_areas_m2(counts, None, from_origin(0, 0, 1, 1)) is None
