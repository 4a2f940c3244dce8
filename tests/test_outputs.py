"""The optional outputs of `deeplab segment`: confidence raster, polygons, dry run, --match-resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import pystac
import pytest
import rasterio
import shapely
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate
from stac_pydantic import Item as StacItem

from pipeline.cli import main


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
        assert conf.scales[0] == pytest.approx(1 / 254) and conf.nodata == 255
        transform, crs = mask_file.transform, mask_file.crs
    assert ((mask == 255) == (confidence == 255)).all(), "confidence is nodata exactly where the mask is"
    six_classes = 6
    assert confidence[mask != 255].min() >= np.floor(254 / six_classes)  # a top class has >= 1/6

    meta, geometries, fields = _polygons(folder / "polygons.gpkg")
    assert pyogrio.read_info(folder / "polygons.gpkg")["crs"] == "EPSG:32618" == crs.to_string()
    assert meta["fields"].tolist() == ["class_id", "class_name", "area_m2"]
    # The checkpoint's background class (unlabeled) is left out; the rest are drawn where the mask has them,
    # small regions merged into their neighbours (tests/test_polygons.py has the rules in detail).
    assert "unlabeled" not in set(fields[1].tolist())
    for class_id in set(fields[0].tolist()):
        drawn = [g for g, c in zip(geometries, fields[0].tolist(), strict=True) if c == class_id]
        burned = rasterize(((g, 1) for g in drawn), out_shape=mask.shape, transform=transform, dtype="uint8")
        truth = mask == class_id
        assert (truth & (burned > 0)).sum() / (truth | (burned > 0)).sum() > 0.6, class_id
    assert fields[2] == pytest.approx([g.area for g in geometries])  # EPSG:32618: planar m²
    report = json.loads((folder / "report.json").read_text())
    # The Dubai model records no pixel size: every report says the resolution went unchecked.
    assert any("records no training pixel size" in line for line in report["warnings"])
    assert sum(report["polygons"].values()) == len(geometries)
    assert report["outputs"]["polygons"] == "polygons.gpkg"
    for name in ("mask.tif", "probabilities.tif"):
        assert cog_validate(str(folder / name)) == (True, [], []), name  # valid, no warnings
    _check_scene_item(out, folder, report)


def _check_scene_item(out: Path, folder: Path, report: dict) -> None:
    """The STAC Item of a published scene, read back by pystac and validated by stac-pydantic, and the
    output folder's catalog linking it."""
    document = json.loads((folder / "item.json").read_text())
    StacItem.model_validate(document)
    item = pystac.Item.from_dict(document)
    assert item.id == folder.name and item.geometry is not None and item.bbox is not None
    projection = ProjectionExtension.ext(item)
    assert projection.code == report["crs"] and projection.shape == report["shape"]
    mask = item.assets["mask"]
    assert mask.media_type == pystac.MediaType.COG and mask.roles == ["data", "labels"]
    classes = ClassificationExtension.ext(mask).classes
    assert [(c.value, c.description) for c in classes[:-1]] == list(enumerate(report["class_pixels"]))
    assert (classes[-1].value, classes[-1].nodata) == (255, True)
    assert [c.count for c in classes[:-1]] == list(report["class_pixels"].values())
    assert all(len(c.color_hint or "") == 6 for c in classes[:-1])
    assert mask.extra_fields["bands"][0]["nodata"] == 255
    for name, asset in item.assets.items():
        path = folder / report["outputs"][name]
        assert FileExtension.ext(asset).checksum == "1220" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert item.assets["quicklook"].roles == ["thumbnail", "overview"]
    assert item.properties["deeplab:checkpoint_sha256"] == report["checkpoint_sha256"]
    assert item.properties["processing:software"] == {"deeplab-pipeline": report["software_version"]}
    # The catalog links the item relatively: the folder can be copied anywhere and browsed.
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    (found,) = list(catalog.get_items())
    assert found.id == item.id and found.get_self_href() == str((folder / "item.json").resolve())


def test_dry_run_prints_the_plan_and_writes_nothing(
    landsat: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["segment", str(landsat), "--model", str(buildings_model), "--out", str(out), "--dry-run"]
    assert main(args) == 1  # 300 m pixels for a 7.5 cm model: refused, both sizes named
    assert "pixel size 300 m is 4.02e+03x coarser than the model's 0.0746 m" in capsys.readouterr().err
    assert main([*args, "--force-resolution"]) == 0
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
    every_region = ("--polygons-background", "--min-area-m2", "0")  # every class, no region merged
    assert _segment(coarse, buildings_model, out, "--match-resolution", "--vectorize", *every_region) == 0
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
    assert cog_validate(str(out / "coarse" / "mask.tif")) == (True, [], [])  # published resampled
    with rasterio.open(out / "coarse" / "mask.tif") as mask:
        assert (mask.shape, mask.transform) == ((512, 512), profile["transform"])
        labels = mask.read(1)
    assert 0.02 < labels.mean() < 0.98, "both classes present"
    plain = tmp_path / "plain"
    assert _segment(coarse, buildings_model, plain) == 0
    with rasterio.open(plain / "coarse" / "mask.tif") as unresampled:
        # Buildings are found at either grid: the two masks agree on most pixels.
        assert (unresampled.read(1) == labels).mean() > 0.8
