from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.checkpoint import load_checkpoint, read_metadata
from pipeline.cli import main
from tests.conftest import copy_kampala_pairs

HELD_OUT = ("OAM-1238456-1046532-21", "OAM-1238457-1046533-21", "OAM-1238458-1046534-21")


def _held_out(kampala: Path, tmp_path: Path) -> tuple[Path, Path]:
    return copy_kampala_pairs(kampala, tmp_path, HELD_OUT)


def test_evaluate_writes_both_reports(
    kampala: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks = _held_out(kampala, tmp_path)
    report_path = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(buildings_model),
                "--images",
                f"{images}/*.tif",
                "--masks",
                f"{masks}/*.tif",
                "--crf",
                "--report",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert set(report) == {"no_crf", "crf"}
    for part in report.values():
        assert part["images"] == 3
        assert set(part["per_class_iou"]) == {"background", "building"}
        for key in ("miou", "pixel_accuracy", "boundary_f1"):
            assert 0.0 <= part[key] <= 1.0
        assert part["per_class_iou"]["building"] > 0.3  # a trained model, not chance
    assert "boundary F1" in capsys.readouterr().out


@pytest.mark.slow
def test_the_reference_building_model_meets_its_held_out_target(
    kampala: Path, reference_buildings_model: Path, tmp_path: Path
) -> None:
    """buildings-kampala on the 16 zoom-21 chips of its held-out ground, with its tuned CRF: IoU(building)
    >= 0.70 (measured 0.698 without the CRF, 0.748 with it)."""
    chips = kampala / "chips"
    images = f"{chips}/OAM-12384[5][6-9]-104653[2-5]-21.tif"
    report = _evaluate(reference_buildings_model, images, kampala / "masks", tmp_path / "r.json", "--crf")
    assert report["crf"]["images"] == 16
    assert report["crf"]["per_class_iou"]["building"] >= 0.70, report["crf"]
    assert report["crf"]["boundary_f1"] > report["no_crf"]["boundary_f1"]


def _evaluate(model: Path, images: Path, masks: Path, report: Path, *extra: str) -> dict[str, Any]:
    args = ["evaluate", "--model", str(model), "--images", str(images), "--masks", str(masks)]
    assert main([*args, "--report", str(report), *extra]) == 0
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def test_evaluate_without_crf_has_no_crf_part(kampala: Path, buildings_model: Path, tmp_path: Path) -> None:
    images, masks = _held_out(kampala, tmp_path)
    single = _evaluate(buildings_model, images, masks, tmp_path / "report.json")
    assert set(single) == {"no_crf"} and single["no_crf"]["scales"] == [1.0]
    # the paper's multi-scale inputs, fused by max: recorded, and they change the predictions
    multi = _evaluate(buildings_model, images, masks, tmp_path / "multi.json", "--scales", "0.75", "1")
    assert multi["no_crf"]["scales"] == [0.75, 1.0]
    assert multi["no_crf"]["miou"] != single["no_crf"]["miou"]
    assert multi["no_crf"]["per_class_iou"]["building"] > 0.3


def test_tune_crf_writes_the_best_parameters_into_the_checkpoint(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    images, masks = _held_out(kampala, tmp_path)
    model = tmp_path / "model.safetensors"
    shutil.copy(buildings_model, model)
    before = load_checkpoint(model)
    tune = ["tune-crf", "--model", str(model), "--images", str(images), "--masks", str(masks), "--crop", "96"]
    assert main([*tune, "--iterations", "3", "--workers", "2"]) == 0
    metadata = read_metadata(model)
    tuning = metadata.crf_tuning
    assert tuning is not None and tuning["trials"] >= 60
    assert metadata.crf.model_dump() == tuning["best"]
    assert metadata.crf.iterations == 3
    best = tuning["best_score"]["miou"]
    assert best >= tuning["paper_defaults"]["miou"]  # the search includes the paper's setting
    after = load_checkpoint(model)
    assert after.metadata.classes == before.metadata.classes
    # the verdict: the chosen setting against no CRF on the images the search did not see
    verdict = metadata.crf_verdict
    assert (
        verdict is not None and verdict.images == len(HELD_OUT) // 3 and tuning["images"] == len(HELD_OUT) - 1
    )
    assert "held out of the search" in verdict.source
    assert metadata.crf_advice()[0] is verdict.helps
    # --verdict-only: the stored CRF measured on other held-out images, no search
    stored = metadata.crf
    assert main([*tune, "--verdict-only"]) == 0
    again = read_metadata(model)
    assert again.crf == stored and again.crf_tuning == tuning
    assert again.crf_verdict is not None and again.crf_verdict.images == len(HELD_OUT)


def test_evaluate_with_the_torch_crf_scores_as_pydensecrf_does(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    images, masks = _held_out(kampala, tmp_path)
    reference = _evaluate(buildings_model, images, masks, tmp_path / "a.json", "--crf")
    torch_crf = _evaluate(
        buildings_model, images, masks, tmp_path / "b.json", "--crf", "--crf-backend", "torch"
    )
    assert reference["crf"]["crf_backend"] == "pydensecrf" and torch_crf["crf"]["crf_backend"] == "torch"
    assert reference["crf"]["miou"] != reference["no_crf"]["miou"]  # the CRF changed something to agree on
    assert abs(torch_crf["crf"]["miou"] - reference["crf"]["miou"]) <= 0.003  # the 0.3 points
