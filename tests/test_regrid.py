from __future__ import annotations

import numpy as np

from pipeline.io.regrid import NearestView
from pipeline.io.sources import resampled_shape


def test_nearest_view_undoes_an_integer_upsampling() -> None:
    source = np.arange(35, dtype=np.uint8).reshape(5, 7)
    staged = source.repeat(2, axis=0).repeat(2, axis=1)  # what --match-resolution x2 stages
    view = NearestView(staged, source.shape, 2.0)
    np.testing.assert_array_equal(view[0:5], source)
    np.testing.assert_array_equal(view[2:4], source[2:4])


def test_nearest_view_of_a_coarser_grid_repeats_pixels() -> None:
    staged = np.arange(12, dtype=np.uint8).reshape(3, 4)
    shape = (6, 8)
    view = NearestView(staged, shape, 0.5)
    np.testing.assert_array_equal(view[0:6], staged.repeat(2, axis=0).repeat(2, axis=1))
    assert resampled_shape(6, 8, 0.5) == staged.shape
