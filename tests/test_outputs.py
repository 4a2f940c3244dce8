"""The optional outputs of `deeplab segment`: confidence raster, polygons, dry run, --match-resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.windows import Window

from models.metadata import ClassInfo
from pipeline.cli import main
from pipeline.io.vectorize import vectorize_mask


def _segment(scene: Path, model: Path, out: Path, *extra: str) -> int:
    args = ["segment", str(scene), "--model", str(model), "--out", str(out), "--engine", "local"]
    return main([*args, "--tile", "256", "--no-crf", *extra])


def _polygons(path: Path) -> tuple[dict, list[shapely.Geometry], list[np.ndarray]]:
    meta, _, geometries, fields = pyogrio.raw.read(path)
    return meta, list(shapely.from_wkb(geometries)), fields


def test_confidence_raster_and_polygons_match_the_mask(
    landsat: Path, landcover_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _segment(landsat, landcover_model, out, "--probabilities", "--vectorize") == 0
    folder = out / "RGB.byte"
    with rasterio.open(folder / "mask.tif") as mask_file, rasterio.open(folder / "probabilities.tif") as conf:
        mask = mask_file.read(1)
        confidence = conf.read(1)
        assert (conf.crs, conf.transform, conf.shape) == (mask_file.crs, mask_file.transform, mask_file.shape)
        assert conf.scales[0] == pytest.approx(1 / 254) and conf.nodata == 255 and conf.overviews(1)
        transform, crs = mask_file.transform, mask_file.crs
    assert ((mask == 255) == (confidence == 255)).all(), "confidence is nodata exactly where the mask is"
    six_classes = 6
    assert confidence[mask != 255].min() >= np.floor(254 / six_classes)  # a top class has >= 1/6

    meta, geometries, fields = _polygons(folder / "polygons.gpkg")
    assert pyogrio.read_info(folder / "polygons.gpkg")["crs"] == "EPSG:32618" == crs.to_string()
    assert meta["fields"].tolist() == ["class_id", "class_name", "pixels"]
    burned = rasterize(
        zip(geometries, fields[0].tolist(), strict=True), out_shape=mask.shape, transform=transform, fill=255
    )
    # Every pixel is covered by exactly its class's polygon, and the nodata collar by none.
    assert (burned == mask).all()
    report = json.loads((folder / "report.json").read_text())
    assert sum(report["polygons"].values()) == len(geometries)
    assert report["outputs"]["polygons"] == "polygons.gpkg"


def test_polygons_are_merged_across_block_borders(tmp_path: Path) -> None:
    labels = np.zeros((300, 400), np.uint8)
    labels[50:250, 30:370] = 1
    labels[100:120, 100:300] = 2
    labels[:, :10] = 255
    classes = [ClassInfo(name=n, color=(0, 0, 0)) for n in ("a", "b", "c")]
    transform = rasterio.transform.from_origin(1000, 2000, 0.5, 0.5)
    small = vectorize_mask(labels, classes, None, transform, tmp_path / "small.gpkg", block=64)
    whole = vectorize_mask(labels, classes, None, transform, tmp_path / "whole.gpkg", block=1024)
    assert small == whole == {"a": 1, "b": 1, "c": 1}
    _, geometries, fields = _polygons(tmp_path / "small.gpkg")
    assert sum(g.area for g in geometries) == pytest.approx((labels != 255).sum() * 0.25)
    assert sorted(fields[2].tolist()) == sorted(int((labels == v).sum()) for v in (0, 1, 2))


def test_dry_run_prints_the_plan_and_writes_nothing(
    landsat: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["segment", str(landsat), "--model", str(buildings_model), "--out", str(out), "--dry-run"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "718x791 px" in printed and "EPSG:32618" in printed
    # The v3+ model's receptive field (745 px) capped at half the core.
    assert "4 cores of 512 px" in printed and "halo 256 px" in printed
    assert "differs from the model's training pixel size" in printed
    assert not out.exists()


def test_match_resolution_segments_on_the_model_grid_and_publishes_on_the_source_grid(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    scene = kampala / "scene" / "kampala_z21_rgb.tif"
    coarse = tmp_path / "coarse.tif"
    with rasterio.open(scene) as source:  # a 0.15 m version of a 1024x1024 piece of the 0.075 m scene
        window = Window(1024, 512, 1024, 1024)
        data = source.read(window=window, out_shape=(3, 512, 512), resampling=Resampling.average)
        profile = source.profile | {
            "height": 512,
            "width": 512,
            "transform": source.window_transform(window) * rasterio.Affine.scale(2),
        }
    with rasterio.open(coarse, "w", **profile) as sink:
        sink.write(data)
    out = tmp_path / "out"
    assert _segment(coarse, buildings_model, out, "--match-resolution", "--vectorize") == 0
    report = json.loads((out / "coarse" / "report.json").read_text())
    assert report["model_grid"] == [1024, 1024] and report["tiles"]["total"] == 16
    # Class areas in m² on a geographic CRS (EPSG:4326) against an independent computation: geodesic
    # areas on the WGS84 ellipsoid (pyproj) of the published polygons.
    _, geometries, fields = _polygons(out / "coarse" / "polygons.gpkg")
    geod = pyproj.Geod(ellps="WGS84")
    for class_id, name in enumerate(["background", "building"]):
        geodesic = sum(
            abs(geod.geometry_area_perimeter(g)[0])
            for g, c in zip(geometries, fields[0].tolist(), strict=True)
            if c == class_id
        )
        assert report["class_areas_m2"][name] == pytest.approx(geodesic, rel=0.01)
    with rasterio.open(out / "coarse" / "mask.tif") as mask:
        assert (mask.shape, mask.transform) == ((512, 512), profile["transform"])
        labels = mask.read(1)
    assert 0.02 < labels.mean() < 0.98, "both classes present"
    plain = tmp_path / "plain"
    assert _segment(coarse, buildings_model, plain) == 0
    with rasterio.open(plain / "coarse" / "mask.tif") as unresampled:
        # Buildings are found at either grid: the two masks agree on most pixels.
        assert (unresampled.read(1) == labels).mean() > 0.8
