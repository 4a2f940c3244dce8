from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio

from pipeline.engine.stage import MARKER, count_valid, stage_scene


def test_landsat_is_staged_exactly_with_its_nodata_mask(landsat: Path, tmp_path: Path) -> None:
    staged = stage_scene(landsat, tmp_path, tile=256)
    image, valid = staged.image(), staged.valid()
    assert image.chunks == (3, 256, 256) and valid.chunks == (256, 256)
    with rasterio.open(landsat) as source:
        np.testing.assert_array_equal(image[:], source.read())
        np.testing.assert_array_equal(valid[:], source.dataset_mask() > 0)
    assert 0 < count_valid(staged) < 791 * 718  # the rotated footprint leaves a nodata collar
    marker = json.loads((staged.folder / MARKER).read_text())
    assert marker["input"] == staged.input_identity and marker["tile"] == 256
    assert not list(staged.folder.glob(".staging*"))


def test_staging_again_reuses_and_a_new_tile_restages(landsat: Path, tmp_path: Path) -> None:
    first = stage_scene(landsat, tmp_path, tile=256)
    stamp = (first.image_path / "zarr.json").stat().st_mtime_ns
    again = stage_scene(landsat, tmp_path, tile=256)
    assert (again.image_path / "zarr.json").stat().st_mtime_ns == stamp
    other = stage_scene(landsat, tmp_path, tile=128)
    assert other.image().chunks == (3, 128, 128)
