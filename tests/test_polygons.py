"""Polygons as GIS and pathology tools take them: sieved, simplified by at most a pixel with shared edges
kept, background left out, areas measured; QuPath GeoJSON validated with geojson-pydantic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from geojson_pydantic import FeatureCollection
from rasterio.features import shapes
from rasterio.transform import Affine

from models.metadata import ClassInfo
from pipeline.io.areas import row_pixel_areas_m2
from pipeline.io.vectorize import (
    DEFAULT_MIN_PIXELS,
    GeoPackageWriter,
    PolygonRules,
    QuPathWriter,
    _simplified_blocks,
    vectorize_mask,
)

BUILDINGS = [
    ClassInfo(name="background", color=(0, 0, 0), role="background"),
    ClassInfo(name="building", color=(227, 26, 28)),
]


@pytest.fixture(scope="module")
def noisy_buildings(kampala: Path) -> tuple[np.ndarray, Affine, rasterio.crs.CRS]:
    """The Kampala scene's real building outlines with 0.2% of pixels flipped (the speckle a model leaves)
    and a nodata strip on the left."""
    with rasterio.open(kampala / "scene" / "kampala_z21_buildings.tif") as source:
        labels, transform, crs = source.read(1)[:1024, :1536].copy(), source.transform, source.crs
    flipped = np.random.default_rng(0).random(labels.shape) < 0.002
    labels[flipped] = 1 - labels[flipped]
    labels[:, :37] = 255
    return labels, transform, crs


def _read(path: Path) -> tuple[list[shapely.Geometry], list[np.ndarray], list[str]]:
    meta, _, geometries, fields = pyogrio.raw.read(path)
    return list(shapely.from_wkb(geometries)), fields, meta["fields"].tolist()


def test_polygons_are_sieved_simplified_within_a_pixel_and_keep_their_shared_edges(
    noisy_buildings: tuple[np.ndarray, Affine, rasterio.crs.CRS], tmp_path: Path
) -> None:
    labels, transform, crs = noisy_buildings
    areas = row_pixel_areas_m2(crs, transform, labels.shape[0])
    every_class = PolygonRules.for_area(BUILDINGS, areas, None, keep_background=True)
    worst = 0.0
    for _, _, polygons in _simplified_blocks(labels, every_class, 512):
        for _, original, simplified in polygons:
            assert simplified.is_valid
            worst = max(worst, shapely.hausdorff_distance(original, simplified))
    assert 0.5 <= worst <= 1.0, "outlines simplified, by at most one pixel"

    out = tmp_path / "all.gpkg"
    counts = vectorize_mask(labels, every_class, GeoPackageWriter, Affine.identity(), None, out, block=256)
    geometries, _, names = _read(out)
    assert names == ["class_id", "class_name", "area_m2"]
    # The coverage is kept: no gaps, no overlaps; the union is exactly the valid pixels.
    valid = int((labels != 255).sum())
    assert sum(g.area for g in geometries) == pytest.approx(valid, abs=1e-6)
    assert shapely.union_all(geometries).area == pytest.approx(valid, abs=1e-6)
    # Speckle is merged into its neighbour: no region under the minimum area is left ...
    assert min(g.area for g in geometries) >= DEFAULT_MIN_PIXELS - 2
    raw = sum(1 for _ in shapes(labels, mask=labels != 255, connectivity=4))
    assert sum(counts.values()) < raw / 20
    # ... and the same regions come out whatever the block size.
    whole = vectorize_mask(
        labels, every_class, GeoPackageWriter, Affine.identity(), None, tmp_path / "w.gpkg"
    )
    assert whole == counts
    assert shapely.union_all(_read(tmp_path / "w.gpkg")[0]).area == pytest.approx(valid, abs=1e-6)


def test_geopackage_leaves_background_out_and_measures_areas_in_square_metres(
    noisy_buildings: tuple[np.ndarray, Affine, rasterio.crs.CRS], tmp_path: Path
) -> None:
    labels, transform, crs = noisy_buildings
    areas = row_pixel_areas_m2(crs, transform, labels.shape[0])
    assert areas is not None
    out = tmp_path / "buildings.gpkg"
    rules = PolygonRules.for_area(BUILDINGS, areas, min_area=5.0)  # 5 m² at ~7.5 cm pixels: ~900 px
    assert rules.min_pixels == int(np.ceil(5.0 / np.median(areas)))
    counts = vectorize_mask(labels, rules, GeoPackageWriter, transform, crs, out, block=512)
    geometries, fields, _ = _read(out)
    assert set(counts) == {"building"} and set(fields[1].tolist()) == {"building"}
    assert pyogrio.read_info(out)["crs"] == "EPSG:4326"
    geod = __import__("pyproj").Geod(ellps="WGS84")
    for geometry, area in zip(geometries, fields[2].tolist(), strict=True):
        assert area >= 5.0 * 0.9
        assert area == pytest.approx(abs(geod.geometry_area_perimeter(geometry)[0]), rel=0.01)
    assert rules.describe("m2")["left_out"] == ["background"]


def test_qupath_geojson_has_detections_annotations_and_areas_in_square_microns(tmp_path: Path) -> None:
    labels = np.zeros((600, 700), np.uint8)
    labels[100:500, 50:650] = 1  # stroma
    for top, left in ((150, 100), (300, 300), (400, 500)):
        labels[top : top + 12, left : left + 14] = 2  # nuclei, ~42 µm² at 0.5 µm/px
    labels[200, 200] = 2  # a one-pixel speck: merged into the stroma
    labels[550:, :] = 255
    classes = [
        ClassInfo(name="background", color=(240, 240, 240), role="background"),
        ClassInfo(name="stroma", color=(227, 119, 194)),
        ClassInfo(name="nuclei", color=(59, 31, 143), role="object"),
    ]
    mpp, level_0_per_mask_px = 0.5, 2.0
    rules = PolygonRules.for_area(classes, np.full(600, mpp**2), None)
    out = tmp_path / "polygons.geojson"
    counts = vectorize_mask(labels, rules, QuPathWriter, Affine.scale(level_0_per_mask_px), None, out, 256)
    assert counts == {"stroma": 1, "nuclei": 3}
    document = json.loads(out.read_text())
    FeatureCollection.model_validate(document)  # GeoJSON as the spec has it
    kinds = {
        f["properties"]["classification"]["name"]: f["properties"]["objectType"] for f in document["features"]
    }
    assert kinds == {"stroma": "annotation", "nuclei": "detection"}
    for feature in document["features"]:
        properties = feature["properties"]
        assert set(properties["classification"]) == {"name", "color"}
        assert len(properties["classification"]["color"]) == 3
        drawn = shapely.geometry.shape(feature["geometry"])  # level-0 pixels: 4 per mask pixel
        assert properties["measurements"]["Area µm^2"] == pytest.approx(drawn.area / 4 * mpp**2, rel=1e-6)
    nuclei = [f for f in document["features"] if f["properties"]["objectType"] == "detection"]
    assert all(40 <= f["properties"]["measurements"]["Area µm^2"] <= 42.5 for f in nuclei)
    xmax = max(shapely.geometry.shape(f["geometry"]).bounds[2] for f in document["features"])
    assert xmax == 650 * level_0_per_mask_px, "coordinates in level-0 pixels"


def test_classes_command_marks_roles_in_a_checkpoint(
    buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from models.checkpoint import read_metadata
    from pipeline.cli import main

    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(buildings_model, checkpoint)
    assert main(["classes", str(checkpoint), "--background", "", "--objects", "building"]) == 0
    assert [c.role for c in read_metadata(checkpoint).classes] == ["region", "object"]
    assert "#e31a1c" in capsys.readouterr().out
    assert main(["classes", str(checkpoint), "--background", "roads"]) == 2
    assert "no class named roads" in capsys.readouterr().err
    assert [c.role for c in read_metadata(checkpoint).classes] == ["region", "object"], "left as it was"
