"""Object F1 (SpaceNet's rule as solaris implements it), and `deeplab evaluate` against vector labels: a
model's predictions over a scene, and a mask a run published."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely

from models.object_metrics import ObjectScores, mask_polygons, match_objects
from pipeline.cli import main

HELD_OUT = "32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764"


def test_object_f1_agrees_with_solaris_on_a_shared_case() -> None:
    """The case exercises each of solaris's rules (solaris.eval.base.Evaluator.eval_iou with miniou 0.5 and
    solaris.eval.iou.calculate_iou); its counts are what those rules give. solaris itself cannot be installed
    beside this project (it pins GDAL's Python bindings, old geopandas and its own torch), so the case is
    worked by its rules, step by step:

    - P0 overlaps T0 with IoU 0.8: a match; T0 leaves the pool.
    - P1 overlaps only T0, already matched: a false positive (greedy, in the predictions' order).
    - P2 has IoU exactly 0.5 with T1: solaris needs more than the threshold, so a false positive; T1 stays.
    - P3 is a bow-tie over T2; repaired with a zero buffer it keeps at most its two triangles: IoU at most
      0.5, a false positive.
    - P4 covers the invalid truth polygon T3: an invalid truth polygon scores IoU 0, a false positive.
    - P5 overlaps T4 and its duplicate T5 with IoU 0.9 each: the tie goes to the first, T4.
    - left in the pool: T1, T2, T3, T5: four false negatives.
    """
    truth = [
        shapely.box(0, 0, 10, 10),  # T0
        shapely.box(20, 0, 30, 10),  # T1
        shapely.box(40, 0, 50, 10),  # T2
        shapely.Polygon([(60, 0), (70, 10), (70, 0), (60, 10)]),  # T3, a bow-tie
        shapely.box(80, 0, 90, 10),  # T4
        shapely.box(80, 0, 90, 10),  # T5, the same polygon as T4 (a duplicated footprint)
    ]
    predicted = [
        shapely.box(0, 0, 10, 8),  # P0
        shapely.box(1, 0, 11, 10),  # P1
        shapely.box(20, 0, 25, 10),  # P2
        shapely.Polygon([(40, 0), (50, 10), (50, 0), (40, 10)]),  # P3, a bow-tie
        shapely.box(60, 0, 70, 10),  # P4
        shapely.box(80, 0, 89, 10),  # P5
    ]
    scores = match_objects(predicted, truth)
    assert scores == ObjectScores(true_positives=2, false_positives=4, false_negatives=4)
    assert scores.precision == pytest.approx(2 / 6) and scores.recall == pytest.approx(2 / 6)
    assert scores.f1 == pytest.approx(1 / 3)
    assert match_objects(list(reversed(predicted)), truth).true_positives == 2
    assert match_objects([], truth) == ObjectScores(0, 0, 6) and match_objects([], []).f1 == 0.0


def test_mask_polygons_are_four_connected_regions() -> None:
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[0:2, 0:2] = 1
    labels[2:4, 2:4] = 1  # touches the first only at a corner: another object
    labels[5, 5] = 1
    polygons = mask_polygons(labels, 1)
    assert sorted(p.area for p in polygons) == [1.0, 4.0, 4.0]


def _published_like(kampala: Path, target: Path) -> Path:
    """The scene's raster mask with the tags `deeplab segment` writes on its masks."""
    with rasterio.open(kampala / "scene" / "kampala_z21_buildings.tif") as source:
        profile = source.profile | {"nodata": 255}
        pixels = source.read(1)
    with rasterio.open(target, "w", **profile) as sink:
        sink.write(pixels, 1)
        sink.update_tags(DEEPLAB_CLASSES=json.dumps(["background", "building"]))
    return target


def test_evaluate_a_published_mask_against_the_footprints(kampala: Path, tmp_path: Path) -> None:
    """A mask made from the footprints scores IoU 1 against them; its objects match but where footprints touch
    (rasterised, two touching buildings are one region)."""
    mask = _published_like(kampala, tmp_path / "mask.tif")
    labels = f"building={kampala / 'labels' / 'osm-buildings.geojson'}"
    report_path = tmp_path / "report.json"
    code = main(
        ["evaluate", "--mask", str(mask), "--labels", labels, "--aoi", "extent", "--report", str(report_path)]
    )
    assert code == 0
    report = json.loads(report_path.read_text())["mask"]
    assert report["per_class_iou"]["building"] == pytest.approx(1.0)
    objects = report["objects"]["building"]
    assert objects["precision"] > 0.9 and objects["recall"] > 0.85 and objects["f1"] > 0.88
    assert objects["true_positives"] + objects["false_negatives"] >= 100  # the footprints on the scene


def test_evaluate_a_model_on_the_held_out_ground_of_a_scene(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    scene = kampala / "scene" / "kampala_z21_rgb.tif"
    labels = f"building={kampala / 'labels' / 'osm-buildings.geojson'}"
    report_path = tmp_path / "report.json"
    args = ["evaluate", "--model", str(tiny_buildings_model), "--scenes", str(scene), "--labels", labels]
    args += ["--val-bbox", HELD_OUT, "--objects", "building", "--whole-image", "--report", str(report_path)]
    assert main(args) == 0
    report = json.loads(report_path.read_text())["no_crf"]
    assert report["images"] == 1 and set(report["objects"]) == {"building"}
    counted = report["objects"]["building"]
    assert counted["true_positives"] + counted["false_negatives"] >= 10  # the footprints of the held-out cell
