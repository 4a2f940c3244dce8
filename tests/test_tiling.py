"""A checkpoint's evaluated tiling: evaluate runs the engine's windows and records them; segment uses them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import load_checkpoint, read_metadata
from models.inference import predict_image
from models.metadata import InputScales, Tiling
from pipeline.cli import main
from pipeline.engine.grid import DEFAULT_TILING, resolve_tiling
from pipeline.engine.options import SegmentOptions
from pipeline.engine.plan import plan_scene
from pipeline.engine.workers import ModelWorker
from pipeline.io.readers import describe
from pipeline.tools.evaluate import tiled_probabilities
from tests.conftest import copy_kampala_pairs, kampala_card, load_model_and_chip

CHIPS = ("OAM-1238456-1046532-21", "OAM-1238457-1046533-21")


def test_tiling_comes_from_the_options_then_the_checkpoint_then_the_default(buildings_model: Path) -> None:
    metadata = read_metadata(buildings_model).model_copy(update={"tiling": None})
    assert resolve_tiling(metadata) == DEFAULT_TILING
    recorded = metadata.model_copy(update={"tiling": Tiling(tile=128, cores_per_window=1)})
    assert resolve_tiling(recorded) == Tiling(tile=128, cores_per_window=1)
    assert resolve_tiling(recorded, tile=256) == Tiling(tile=256, cores_per_window=1)
    assert resolve_tiling(recorded, cores_per_window=3) == Tiling(tile=128, cores_per_window=3)


def test_tiled_probabilities_stitch_each_core_from_its_own_window(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    loaded, image = load_model_and_chip(kampala, buildings_model, tmp_path, CHIPS[0])
    worker = ModelWorker(str(buildings_model), device="cpu", threads=None, amp=False, loaded=loaded)
    whole = predict_image(worker.model, loaded.metadata, image)
    # one window that holds the whole chip: the whole-image pass (probabilities travel as float16)
    covering = tiled_probabilities(worker, image, Tiling(tile=256, cores_per_window=1), 64, InputScales())
    np.testing.assert_allclose(covering, whole, atol=2e-3)
    # 64 px cores, each read with 32 px of halo: every pixel written, each core from its own window
    tiled = tiled_probabilities(worker, image, Tiling(tile=64, cores_per_window=1), 32, InputScales())
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=5e-3)
    window = image[:, 64 - 32 : 128 + 32, 128 - 32 : 192 + 32]
    alone = predict_image(worker.model, loaded.metadata, window)
    np.testing.assert_allclose(tiled[:, 64:128, 128:192], alone[:, 32:96, 32:96], atol=2e-3)
    assert not np.allclose(tiled, whole, atol=2e-3)  # image pooling over 128 px windows differs


def _chips_and_a_model_copy(kampala: Path, model: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two real chips and a copy of ``model`` that a test may rewrite."""
    images, masks = copy_kampala_pairs(kampala, tmp_path, CHIPS)
    copy = tmp_path / "model.safetensors"
    shutil.copy(model, copy)
    return images, masks, copy


def test_evaluate_saves_its_tiling_and_segment_uses_it(
    kampala: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks, model = _chips_and_a_model_copy(kampala, buildings_model, tmp_path)
    args = ["evaluate", "--model", str(model), "--images", str(images), "--masks", str(masks)]

    def report(*extra: str) -> dict[str, object]:
        path = tmp_path / "report.json"
        assert main([*args, "--report", str(path), *extra]) == 0
        no_crf: dict[str, object] = json.loads(path.read_text())["no_crf"]
        return no_crf

    whole = report()
    assert whole["tiling"] == "whole image"
    tiled = report("--tile", "64", "--cores-per-window", "1", "--save-tiling")
    assert tiled["tiling"] == {"tile": 64, "cores_per_window": 1, "halo": 32}
    assert tiled["miou"] != whole["miou"]
    assert read_metadata(model).tiling == Tiling(tile=64, cores_per_window=1)
    assert load_checkpoint(model).metadata.tiling == Tiling(tile=64, cores_per_window=1)
    # evaluate and segment now default to it; what is asked still wins
    assert report()["tiling"] == tiled["tiling"]
    assert report("--whole-image")["tiling"] == "whole image"
    scene = describe(kampala / "scene" / "kampala_z21_rgb.tif")
    metadata = read_metadata(model)
    assert plan_scene(scene, metadata, SegmentOptions()).tiling == Tiling(tile=64, cores_per_window=1)
    asked = plan_scene(scene, metadata, SegmentOptions(tile=256)).tiling
    assert asked == Tiling(tile=256, cores_per_window=1)
    assert plan_scene(scene, read_metadata(buildings_model), SegmentOptions()).tiling == DEFAULT_TILING
    capsys.readouterr()
    assert main([*args, "--whole-image", "--tile", "64"]) == 2
    assert "--whole-image" in capsys.readouterr().err


def test_tune_tiling_stores_the_best_core_size_and_the_card_shows_it(
    kampala: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks, model = _chips_and_a_model_copy(kampala, buildings_model, tmp_path)
    args = ["tune-tiling", "--model", str(model), "--images", str(images), "--masks", str(masks)]
    assert main([*args, "--tiles", "64", "32", "--cores-per-window", "1", "--tta", "none", "hflip"]) == 0
    metadata = read_metadata(model)
    tuning = metadata.tiling_tuning
    assert tuning is not None and tuning["images"] == 2
    # the views are scored on the best tiling, after the tilings (each on a single view)
    views = tuning["trials"][3:]
    assert [v["tta"] for v in views] == ["hflip"] and views[0]["tiling"] == tuning["best"]
    one_view = {v["tta"]: v["miou"] for v in tuning["trials"] if v["tiling"] == tuning["best"]}
    assert (
        metadata.tta
        == tuning["best_tta"]
        == max(one_view, key=lambda k: (round(one_view[k], 3), k == "none"))
    )
    scores = {json.dumps(t["tiling"]): t["miou"] for t in tuning["trials"][:3]}
    assert len(scores) == 3 and '"whole image"' in scores
    tiled = {k: v for k, v in scores.items() if k != '"whole image"'}
    best = json.loads(max(tiled, key=lambda k: tiled[k]))
    assert metadata.tiling == Tiling.model_validate(best) and best["cores_per_window"] == 1
    assert tuning["best_miou"] == pytest.approx(one_view[tuning["best_tta"]])
    card = kampala_card(model, tmp_path)
    assert f"cuts scenes into {best['tile']} px cores in blocks of 1²" in card
    assert "Chosen by `deeplab tune-tiling` on 2 images" in card
    capsys.readouterr()
    assert main([*args, "--exclude-classes", "roads"]) == 2
    assert "roads" in capsys.readouterr().err


def test_windows_far_larger_than_the_training_crops_warn_unless_a_tiling_is_chosen(
    kampala: Path, buildings_model: Path
) -> None:
    scene = describe(kampala / "scene" / "kampala_z21_rgb.tif")
    metadata = read_metadata(buildings_model)  # v3+ trained on 256 px crops, no tiling stored

    def warned(metadata: object, options: SegmentOptions) -> list[str]:
        plan = plan_scene(scene, metadata, options)  # type: ignore[arg-type]
        return [w for w in plan.check.warnings if "tune-tiling" in w]

    assert warned(metadata, SegmentOptions()) == [
        "windows of up to 1280 px are 5.0x the 256 px crops the model was trained on, and its image pooling "
        "averages each whole window: `deeplab tune-tiling` stores a tiling measured on validation images "
        "(or pass --tile)"
    ]
    assert warned(metadata, SegmentOptions(tile=128)) == []
    assert warned(metadata, SegmentOptions(context="scene")) == []
    stored = metadata.model_copy(update={"tiling": Tiling(tile=512, cores_per_window=2)})
    assert warned(stored, SegmentOptions()) == []
