"""Slides with QuPath annotations: hand-drawn annotations over CMU-1 and the project's own QuPath output read
back, rasterised at the model's µm/px; training and evaluation on the annotated regions only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine

from models.checkpoint import read_metadata
from models.metadata import ClassInfo
from models.scene_training import SceneTrainingSpec
from models.vector_labels import LabelRules, read_labels
from pipeline.cli import main
from pipeline.io.vectorize import PolygonRules, QuPathWriter, vectorize_mask
from pipeline.tools.slide_training import open_annotated_slide

ANNOTATIONS = Path(__file__).parent / "data" / "cmu1-regions.geojson"
CLASSES = ("background", "stroma", "epithelium")
HELD_OUT = "0,2250,2220,2967"  # the bottom band of the slide, in level-0 pixels


def _spec(**changes: object) -> SceneTrainingSpec:
    fields: dict[str, object] = {
        "scenes": (),
        "labels": (str(ANNOTATIONS),),
        "classes": CLASSES,
        "background": "background",
        "ignore_index": 255,
    }
    return SceneTrainingSpec(**(fields | changes))  # type: ignore[arg-type]


def test_hand_drawn_annotations_become_masks_inside_the_annotated_regions_only(cmu_slide: Path) -> None:
    labels = read_labels(ANNOTATIONS, LabelRules(CLASSES))
    assert labels.crs is None and labels.count == 16
    assert labels.record(CLASSES)["classes"] == {"background": 5, "stroma": 6, "epithelium": 5}
    fewer = read_labels(
        ANNOTATIONS, LabelRules(("background", "stroma", "nuclei"), class_map={"epithelium": "ignore"})
    )
    assert fewer.count == 11 and len(fewer.skipped) == 5 and "mapped to ignore" in fewer.skipped[0]
    slide = open_annotated_slide(cmu_slide, [labels], _spec(), None)  # at level 0: 0.499 µm/px
    assert slide.grid_shape == (2967, 2220) and slide.pixel_size_m == pytest.approx(0.499e-6, rel=1e-3)
    image, mask = slide.read(1800, 1130, 100, 100)  # inside the epithelium region drawn at x 1130-1290
    assert image.shape == (3, 100, 100) and set(mask.unique().tolist()) <= {2, 255}
    assert (mask == 2).float().mean() > 0.9
    _, everything = slide.read(0, 0, 2967, 2220, step=4)
    shares = np.bincount(everything.numpy().ravel(), minlength=256)[[0, 1, 2, 255]] / everything.numel()
    assert shares[3] > 0.6  # unannotated tissue and glass: ignored, not background
    assert all(share > 0.01 for share in shares[:3])
    coarser = open_annotated_slide(cmu_slide, [labels], _spec(), 0.998e-6)  # a model at twice the µm/px
    assert coarser.grid_shape == (1483, 1110)
    _, half = coarser.read(900, 565, 50, 50)
    assert (half == 2).float().mean() > 0.9


def test_the_projects_own_qupath_output_reads_back_as_labels(tmp_path: Path) -> None:
    """A class raster written as QuPath GeoJSON by the engine's writer, then read as training labels."""
    raster = np.zeros((300, 400), dtype=np.uint8)
    raster[20:120, 30:200] = 1
    raster[150:280, 220:380] = 2
    raster[200:210, 40:50] = 2  # a small object: a detection
    classes = [
        ClassInfo(name="background", color=(240, 240, 240), role="background"),
        ClassInfo(name="stroma", color=(227, 119, 194)),
        ClassInfo(name="epithelium", color=(112, 48, 160), role="object"),
    ]
    out = tmp_path / "polygons.geojson"
    rules = PolygonRules.for_area(classes, None, None)
    vectorize_mask(raster, rules, QuPathWriter, Affine.scale(2.0), None, out, 256)  # level 0 = 2 mask px
    written = json.loads(out.read_text())
    assert {f["properties"]["objectType"] for f in written["features"]} == {"annotation", "detection"}
    labels = read_labels(out, LabelRules(CLASSES))
    assert labels.crs is None and sorted(labels.class_ids) == [1, 2, 2]
    from models.vector_labels import rasterise_labels

    back = rasterise_labels(labels, Affine.scale(2.0), raster.shape, None, 0, (2, 1, 0), 255)
    assert (back == raster).mean() > 0.99  # the outlines are simplified by at most a pixel


def test_train_and_evaluate_on_a_slide_and_its_annotations(
    cmu_slide: Path, tiny_slide_model: Path, tmp_path: Path
) -> None:
    """Fine-tuned from a 3-class slide model whose nuclei class the annotations do not have: epithelium is
    a new class, and the annotations name only the regions the model trains on."""
    out = tmp_path / "annotated.safetensors"
    args = ["train", "--slides", str(cmu_slide), "--labels", str(ANNOTATIONS), "--val-bbox", HELD_OUT]
    args += ["--classes", ",".join(CLASSES), "--background-classes", "background", "--block-size", "256"]
    args += ["--init-from", str(tiny_slide_model)]  # its architecture, as no --arch is given
    args += ["--pretrained", "none", "--epochs", "1", "--batch-size", "4", "--crop-size", "96"]
    args += ["--out", str(out)]
    assert main(args) == 0
    metadata = read_metadata(out)
    assert metadata.architecture == read_metadata(tiny_slide_model).architecture
    data = metadata.training["data"]
    assert data["source"] == "slides+QuPath annotations" and data["aoi"] == {"kind": "annotated regions"}
    assert data["labels"][0]["classes"] == {"background": 5, "stroma": 6, "epithelium": 5}
    assert data["val_images"] > 0 and all(
        block["split"] == "val" for block in data["blocks"] if block["row"] >= 2250
    )
    assert metadata.pixel_size_m == pytest.approx(read_metadata(tiny_slide_model).pixel_size_m)
    assert metadata.metrics["history"][0]["epoch"] == 0  # the starting model on the same held-out blocks
    report = tmp_path / "report.json"
    args = ["evaluate", "--model", str(out), "--slides", str(cmu_slide), "--labels", str(ANNOTATIONS)]
    assert main([*args, "--val-bbox", HELD_OUT, "--whole-image", "--report", str(report)]) == 0
    scores = json.loads(report.read_text())["no_crf"]
    assert scores["images"] == 1 and set(scores["per_class_iou"]) == set(CLASSES)
