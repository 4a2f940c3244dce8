"""Test-time augmentation: flipped and transposed views of each window, averaged back in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

from deeplab_common.errors import ConfigError
from models.checkpoint import read_metadata
from models.inference import TTA_VIEWS, _unview, _view, normalise, predict_image, predict_probabilities
from models.metadata import InputScales, Tiling
from models.registry import build_model
from pipeline.cli import main
from pipeline.engine.options import SegmentOptions
from pipeline.engine.plan import plan_scene
from pipeline.engine.workers import ModelWorker
from pipeline.io.readers import describe
from pipeline.tools.evaluate import tiled_probabilities
from tests.conftest import copy_kampala_pairs, kampala_card, load_model_and_chip
from tests.test_segment import _segment
from tests.test_tiling import CHIPS


@pytest.mark.parametrize("tta", sorted(TTA_VIEWS))
def test_every_view_is_undone_on_a_non_square_batch(tta: str) -> None:
    batch = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    for view in TTA_VIEWS[tta]:
        assert torch.equal(_unview(_view(batch, view), view), batch)
    assert len(set(TTA_VIEWS[tta])) == len(TTA_VIEWS[tta])  # no view counted twice


def test_d4_averaging_makes_a_model_equivariant_to_rotations_and_flips(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    """A trained model on a real chip: turn or flip the input, and the averaged map turns or flips with it."""
    loaded, image = load_model_and_chip(kampala, buildings_model, tmp_path, CHIPS[0])
    batch = normalise(image[:, 64:192, 32:160], loaded.metadata.bands)[None]
    rotated = torch.rot90(batch, 1, (-2, -1))
    flipped = batch.flip(-1)

    def probabilities(x: torch.Tensor, tta: str) -> torch.Tensor:
        return predict_probabilities(loaded.model, x, tta=tta)

    averaged = probabilities(batch, "d4")
    turned = torch.rot90(averaged, 1, (-2, -1))
    torch.testing.assert_close(probabilities(rotated, "d4"), turned, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities(flipped, "d4"), averaged.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities(flipped, "hflip"), probabilities(batch, "hflip").flip(-1))
    # a single view is not: the test would catch views averaged out of place
    plain = probabilities(batch, "none")
    assert (probabilities(rotated, "none") - torch.rot90(plain, 1, (-2, -1))).abs().max() > 0.05
    assert (averaged - plain).abs().max() > 0.05


def test_an_unknown_augmentation_is_refused() -> None:
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=2, in_channels=3).eval()
    with pytest.raises(ConfigError, match="unknown test-time augmentation 'spin'"):
        predict_probabilities(model, torch.zeros(1, 3, 32, 32), tta="spin")


def test_tiled_views_keep_each_core_equal_to_its_window_alone(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    """Views are taken of the padded window, so flipped windows stay on the scene's lattice: a core of the
    tiled, augmented map is what its window alone gives with the same views."""
    loaded, image = load_model_and_chip(kampala, buildings_model, tmp_path, CHIPS[0])
    worker = ModelWorker(str(buildings_model), device="cpu", threads=None, amp=False, loaded=loaded)
    tiled = tiled_probabilities(worker, image, Tiling(tile=64, cores_per_window=1), 32, InputScales(), "d4")
    window = image[:, 64 - 32 : 128 + 32, 128 - 32 : 192 + 32]
    alone = predict_image(worker.model, loaded.metadata, window, tta="d4")
    np.testing.assert_allclose(tiled[:, 64:128, 128:192], alone[:, 32:96, 32:96], atol=2e-3)
    plain = tiled_probabilities(worker, image, Tiling(tile=64, cores_per_window=1), 32, InputScales())
    assert np.abs(tiled - plain).max() > 0.05  # the views changed the map


def test_evaluate_saves_its_views_and_segment_averages_them(
    kampala: Path, landsat: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks = copy_kampala_pairs(kampala, tmp_path, CHIPS)
    model = tmp_path / "model.safetensors"
    shutil.copy(buildings_model, model)
    args = ["evaluate", "--model", str(model), "--images", str(images), "--masks", str(masks)]
    report_path = tmp_path / "report.json"

    def no_crf(*extra: str) -> dict[str, Any]:
        assert main([*args, "--report", str(report_path), *extra]) == 0
        return dict(json.loads(report_path.read_text())["no_crf"])

    plain = no_crf()
    assert plain["tta"] == "none"
    flipped = no_crf("--tta", "flips", "--save-tta")
    assert flipped["tta"] == "flips" and flipped["miou"] != plain["miou"]
    assert read_metadata(model).tta == "flips"
    assert no_crf()["miou"] == flipped["miou"]  # the stored views are evaluate's default now
    capsys.readouterr()
    assert main([*args, "--save-tta"]) == 2
    assert "--save-tta needs" in capsys.readouterr().err

    card = kampala_card(model, tmp_path)
    assert "averages the logits of each window flipped both ways (4 views)" in card

    # segment averages the stored views; what is asked wins, and a change of views is a new result
    scene = describe(landsat)
    let_through = SegmentOptions(
        force_resolution=True
    )  # 300 m pixels, a 7.5 cm model: the plan, not a result
    assert plan_scene(scene, read_metadata(model), let_through).tta == "flips"
    assert (
        plan_scene(scene, read_metadata(model), let_through.model_copy(update={"tta": "none"})).tta == "none"
    )
    out = tmp_path / "out"
    assert _segment(landsat, model, out, "--no-crf", "--engine", "local") == 0
    report = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert report["tta"] == "flips" and report["tiles"]["computed"] >= 1
    with rasterio.open(out / "RGB.byte" / "mask.tif") as mask:
        assert mask.tags()["DEEPLAB_TTA"] == "flips"
        flipped_labels = mask.read(1)
    assert _segment(landsat, model, out, "--no-crf", "--engine", "local", "--tta", "none") == 0
    again = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert again["tta"] == "none" and again["tiles"]["computed"] == report["tiles"]["computed"]
    with rasterio.open(out / "RGB.byte" / "mask.tif") as mask:
        assert (mask.read(1) != flipped_labels).any()
