"""Preflight of scenes against a checkpoint: one line per problem naming the file; warnings; resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from deeplab_common.errors import DataError, ResolutionMismatch
from models.checkpoint import read_metadata
from pipeline.engine.preflight import preflight
from pipeline.io.readers import describe


def _raster(path: Path, dtype: str = "uint8", bands: int = 3, pixel: float = 0.0746, **extra: object) -> Path:
    profile = {
        "driver": "GTiff",
        "height": 64,
        "width": 64,
        "count": bands,
        "dtype": dtype,
        "crs": CRS.from_epsg(32636),
        "transform": from_origin(450000, 40000, pixel, pixel),
        **extra,
    }
    with rasterio.open(path, "w", **profile) as sink:
        sink.write(np.ones((bands, 64, 64), dtype=dtype))
    return path


def test_a_matching_scene_passes_with_no_warning_but_the_missing_nodata(
    tmp_path: Path, buildings_model: Path
) -> None:
    result = preflight(describe(_raster(tmp_path / "ok.tif", nodata=0)), read_metadata(buildings_model))
    result.raise_if_refused()
    assert result.problems == [] and result.warnings == [] and result.scale == 1.0


def test_every_problem_is_its_own_line_naming_the_file(tmp_path: Path, buildings_model: Path) -> None:
    scene = _raster(tmp_path / "deep.tif", dtype="uint16", bands=4)
    result = preflight(describe(scene), read_metadata(buildings_model))
    with pytest.raises(DataError) as refused:
        result.raise_if_refused()
    lines = str(refused.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{scene}: ") for line in lines)
    assert "4 band(s) but the model expects 3" in lines[0]
    assert "16-bit uint16 samples (0-65535)" in lines[1] and "(0-255)" in lines[1]


def test_declared_bit_depth_is_honoured(tmp_path: Path, buildings_model: Path) -> None:
    scene = _raster(tmp_path / "twelve.tif", dtype="uint16", NBITS=12)
    assert describe(scene).bits == 12
    result = preflight(describe(scene), read_metadata(buildings_model))
    assert any("12-bit uint16 samples (0-4095)" in p for p in result.problems)


def test_pixel_size_far_from_the_model_warns_or_resamples(tmp_path: Path, buildings_model: Path) -> None:
    metadata = read_metadata(buildings_model)
    scene = describe(_raster(tmp_path / "coarse.tif", pixel=0.3, nodata=0))
    warned = preflight(scene, metadata)
    assert warned.problems == [] and warned.scale == 1.0
    assert any("differs from the model's training pixel size" in w for w in warned.warnings)
    resampled = preflight(scene, metadata, match_resolution=True)
    assert resampled.scale == pytest.approx(0.3 / metadata.pixel_size_m, rel=1e-3)
    assert any("--match-resolution" in w for w in resampled.warnings)
    landsat_like = describe(_raster(tmp_path / "landsat.tif", pixel=30.0))
    too_far = preflight(landsat_like, metadata, match_resolution=True)
    assert any("resamples by at most 8x" in p for p in too_far.mismatches) and not too_far.problems
    with pytest.raises(ResolutionMismatch, match=r"landsat\.tif: pixel size 30 m"):
        too_far.raise_if_refused()


def test_ungeoreferenced_scene_is_refused_unless_allowed(tmp_path: Path, buildings_model: Path) -> None:
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=3, dtype="uint8") as sink:
        sink.write(np.zeros((3, 32, 32), np.uint8))
    metadata = read_metadata(buildings_model)
    assert any("no CRS/transform" in p for p in preflight(describe(path), metadata).problems)
    assert preflight(describe(path), metadata, allow_ungeoreferenced=True).problems == []
