"""Vector labels over scenes: read as users keep them, rasterised exactly, refused with one line when bad, and
trained on from the real Kampala scene and its OpenStreetMap footprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from deeplab_common.errors import DataError
from models.checkpoint import read_metadata
from models.scene_blocks import SceneRules, ground_blocks, open_scene, split_blocks
from models.vector_labels import LabelRules, read_labels
from pipeline.cli import main

CLASSES = ("background", "building")
# The zoo's held-out ground: the zoom-19 tile 309614/261633, a 1024 px cell of the scene
HELD_OUT = "32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764"


@pytest.fixture(scope="module")
def scene(kampala: Path) -> Path:
    return kampala / "scene" / "kampala_z21_rgb.tif"


@pytest.fixture(scope="module")
def footprints(kampala: Path) -> Path:
    path = kampala / "labels" / "osm-buildings.geojson"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data without the OSM footprints)")
    return path


def _write(path: Path, geometries: list[shapely.Geometry], crs: str | None, **fields: list[object]) -> Path:
    columns = {name: np.asarray(values) for name, values in fields.items()}
    pyogrio.raw.write(
        path,
        shapely.to_wkb(np.asarray(geometries, dtype=object)),
        list(columns.values()),
        fields=list(columns),
        geometry_type="Unknown",
        crs=crs,
        driver="GeoJSON" if path.suffix == ".geojson" else "GPKG",
    )
    return path


def test_the_osm_footprints_rasterise_to_the_published_mask(
    scene: Path, footprints: Path, kampala: Path
) -> None:
    labels = read_labels(footprints, LabelRules(CLASSES, file_class="building"))
    assert labels.count == 108 and len(labels.repaired) == 1  # the one self-intersecting footprint, repaired
    assert "feature 101" in labels.repaired[0] and "Self-intersection" in labels.repaired[0]
    placed = open_scene(scene, [labels], SceneRules(0, (1, 0), 255), "extent", 50, None)
    _, mask = placed.read(0, 0, *placed.grid_shape)
    with rasterio.open(kampala / "scene" / "kampala_z21_buildings.tif") as published:
        assert np.array_equal(mask.numpy(), published.read(1).astype(np.int64))


def test_labels_in_another_crs_and_format_with_a_class_map_land_on_the_same_pixels(
    scene: Path, footprints: Path, tmp_path: Path
) -> None:
    """Reprojected to UTM 36N and written as a GeoPackage whose attribute says 'yes' (OSM's building=yes)."""
    labels = read_labels(footprints, LabelRules(CLASSES, file_class="building"))
    utm = labels.in_crs(rasterio.crs.CRS.from_epsg(32636))
    gpkg = _write(tmp_path / "b.gpkg", list(utm.geometries), "EPSG:32636", building=["yes"] * utm.count)
    mapped = read_labels(gpkg, LabelRules(CLASSES, class_field="building", class_map={"yes": "building"}))
    rules = SceneRules(0, (1, 0), 255)
    a = open_scene(scene, [labels], rules, "extent", 50, None).read(0, 0, 512, 512)[1]
    b = open_scene(scene, [mapped], rules, "extent", 50, None).read(0, 0, 512, 512)[1]
    assert (a != b).float().mean() < 0.001  # two reprojections round coordinates: at most a few edge pixels


def test_the_area_of_interest_ignores_what_the_labels_do_not_cover(scene: Path, footprints: Path) -> None:
    labels = read_labels(footprints, LabelRules(CLASSES, file_class="building"))
    rules = SceneRules(0, (1, 0), 255)
    near = open_scene(scene, [labels], rules, None, 2.0, None)  # 2 m around each footprint
    _, mask = near.read(0, 0, *near.grid_shape, step=4)
    shares = np.bincount(mask.numpy().ravel(), minlength=256)[[0, 1, 255]] / mask.numel()
    assert shares[2] > 0.3 and shares[1] > 0.15  # far from any footprint: ignored, not background
    blocks = ground_blocks(near, 512)
    train, val, left_out = split_blocks(blocks, tuple(map(float, HELD_OUT.split(","))), 0.2, 0)
    assert len(val) == 4 and left_out == 0  # the held-out cell is 2 x 2 blocks, aligned with the grid
    assert all(b.split == "val" for b in val) and not {b.name for b in train} & {b.name for b in val}
    seeded = split_blocks(ground_blocks(near, 512), None, 0.25, 7)
    again = split_blocks(ground_blocks(near, 512), None, 0.25, 7)
    assert [b.name for b in seeded[1]] == [b.name for b in again[1]] and len(seeded[1]) == len(blocks) // 4


def _one_tiny_epoch(out: Path) -> list[str]:
    """The rest of a `deeplab train` command: the two classes, the tiny model, one short epoch."""
    return [
        *(
            "--classes",
            "background,building",
            "--background-classes",
            "background",
            "--arch",
            "deeplabv2_tiny",
        ),
        *(
            "--pretrained",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--crop-size",
            "128",
            "--out",
            str(out),
        ),
    ]


def _bad(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """Each bad label file, the extra flags it is used with, and what its one line must say."""
    box = shapely.box(32.5945, 0.3505, 32.5946, 0.3506)
    bowtie = shapely.Polygon([(32.5945, 0.3505), (32.5946, 0.3506), (32.5946, 0.3505), (32.5945, 0.3506)])
    far = shapely.box(10.0, 50.0, 10.001, 50.001)
    utm_coordinates = shapely.box(453_000, 38_700, 453_010, 38_710)
    qupath_unknown = tmp_path / "unknown.geojson"
    qupath_unknown.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "id": "a1",
                        "geometry": shapely.geometry.mapping(shapely.box(10, 10, 50, 50)),
                        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
                    }
                ],
            }
        )
    )
    ellipse = tmp_path / "ellipse.geojson"
    ellipse.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "id": "e1",
                    "geometry": {**shapely.geometry.mapping(shapely.box(0, 0, 9, 9)), "isEllipse": True},
                    "properties": {"objectType": "annotation", "classification": {"name": "building"}},
                }
            ]
        )
    )
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    return {
        "empty": (empty, ["--labels", f"building={empty}"], "holds no features"),
        "no crs": (
            _write(tmp_path / "nocrs.gpkg", [box], None, k=[1]),
            [],
            "declares no CRS",
        ),
        "wrong crs": (
            _write(tmp_path / "wrong.gpkg", [utm_coordinates], "EPSG:4326", k=[1]),
            [],
            "are not degrees: a wrong CRS",
        ),
        "misses the scene": (
            _write(tmp_path / "far.gpkg", [far], "EPSG:4326", k=[1]),
            [],
            "none of its 1 polygons falls on a scene",
        ),
        "unknown class": (
            _write(tmp_path / "classes.gpkg", [box], "EPSG:4326", kind=["garage"]),
            ["--class-field", "kind"],
            "feature 1: class value 'garage' is not one of the model's classes",
        ),
        "self-intersection": (
            _write(tmp_path / "bowtie.gpkg", [bowtie], "EPSG:4326", k=[1]),
            ["--invalid-labels", "fail"],
            "feature 1: invalid polygon (Self-intersection",
        ),
        "points": (
            _write(tmp_path / "points.gpkg", [shapely.Point(32.5945, 0.3505)], "EPSG:4326", k=[1]),
            [],
            "feature 1 is a Point; labels must be polygons",
        ),
        "lines": (
            _write(tmp_path / "lines.gpkg", [box.exterior], "EPSG:4326", k=[1]),
            [],
            "labels must be polygons",
        ),
        "qupath unknown class": (qupath_unknown, [], "feature a1: class value 'Tumor'"),
        "qupath ellipse": (ellipse, [], "feature e1 is an ellipse ROI written as 5 vertices"),
    }


def test_each_bad_label_file_is_one_line_naming_it_and_nothing_is_trained(
    scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _bad(tmp_path)
    capsys.readouterr()  # what writing the files said (GDAL warns of the file without a CRS)
    for case, (path, flags, expected) in cases.items():
        out = tmp_path / f"{case}.safetensors"
        labels = (
            []
            if "--labels" in flags
            else ["--labels", f"building={path}" if "class" not in case else str(path)]
        )
        args = ["train", "--scenes", str(scene), *labels, *flags, "--classes", ",".join(CLASSES)]
        code = main(
            [*args, "--arch", "deeplabv2_tiny", "--pretrained", "none", "--epochs", "1", "--out", str(out)]
        )
        error = capsys.readouterr().err.strip()
        assert code == 2, (case, error)
        assert len(error.splitlines()) == 1 and str(path) in error and expected in error, (case, error)
        assert not out.exists(), case


def test_repaired_and_skipped_features_are_counted(footprints: Path) -> None:
    skipped = read_labels(footprints, LabelRules(CLASSES, file_class="building", invalid="skip"))
    assert skipped.count == 107 and len(skipped.skipped) == 1
    with pytest.raises(DataError, match="feature 101: invalid polygon"):
        read_labels(footprints, LabelRules(CLASSES, file_class="building", invalid="fail"))


def test_train_on_the_scene_and_its_footprints_records_its_sources(
    scene: Path, footprints: Path, tmp_path: Path
) -> None:
    out = tmp_path / "osm.safetensors"
    args = ["train", "--scenes", str(scene), "--labels", f"building={footprints}", "--val-bbox", HELD_OUT]
    assert main([*args, *_one_tiny_epoch(out)]) == 0
    metadata = read_metadata(out)
    data = metadata.training["data"]
    assert data["labels"] == [
        {
            "file": "osm-buildings.geojson",
            "sha256": data["labels"][0]["sha256"],
            "features": 108,
            "crs": "EPSG:4326",
            "classes": {"building": 108},
            "repaired": 1,
            "skipped": 0,
        }
    ]
    assert len(data["labels"][0]["sha256"]) == 64 and data["aoi"] == {
        "kind": "labels buffered",
        "buffer_m": 50.0,
    }
    splits = [block["split"] for block in data["blocks"]]
    assert splits.count("val") == 4 and splits.count("train") == data["train_images"] == 20
    assert metadata.pixel_size_m == pytest.approx(0.0746, abs=1e-3)
    assert "val" in metadata.metrics and metadata.metrics["val"]["images"] == 4


def test_held_out_blocks_can_be_labelled_by_other_files(
    scene: Path, footprints: Path, tmp_path: Path
) -> None:
    """The loop's case: training labels trusted only in one corrected area, the held-out ground scored against
    the footprints (`--val-labels`)."""
    area = shapely.box(32.594375610351562, 0.35018702872728885, 32.595062255859375, 0.3508736613849764)
    labels = read_labels(footprints, LabelRules(CLASSES, file_class="building"))
    inside = [g for g in labels.geometries if g.centroid.within(area)]
    corrected = _write(
        tmp_path / "corrected.gpkg", inside, "EPSG:4326", class_name=["building"] * len(inside)
    )
    aoi = _write(tmp_path / "area.gpkg", [area], "EPSG:4326", name=["corrected"])
    out = tmp_path / "loop.safetensors"
    args = ["train", "--scenes", str(scene), "--labels", str(corrected), "--class-field", "class_name"]
    args += ["--aoi", str(aoi), "--val-labels", f"building={footprints}", "--val-bbox", HELD_OUT]
    assert main([*args, *_one_tiny_epoch(out)]) == 0
    data = read_metadata(out).training["data"]
    # the corrected cell trains, the held-out cell scores
    assert data["train_images"] == 4 and data["val_images"] == 4
    assert data["labels"][0]["features"] == len(inside) and data["val_labels"][0]["features"] == 108
    assert read_metadata(out).metrics["val"]["per_class_iou"]["building"] is not None
