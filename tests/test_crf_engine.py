"""The CRF's backend and placement through the engine, and the checkpoint's advice on whether to run it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from models.checkpoint import update_metadata
from models.metadata import CRFVerdict
from models.metrics import PairedBootstrap, SegmentationMetrics
from pipeline.cli import main
from tests.test_driver import _crop

BASE = ["--tile", "128", "--halo", "32"]


@pytest.fixture(scope="module")
def crop(kampala: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _crop(
        kampala / "scene" / "kampala_z21_rgb.tif", tmp_path_factory.mktemp("scene") / "k.tif", 1024, 1536
    )


def _run(scene: Path, model: Path, out: Path, *flags: str) -> tuple[np.ndarray, dict, dict]:
    assert main(["segment", str(scene), "--model", str(model), "--out", str(out), *BASE, *flags]) == 0
    with rasterio.open(out / scene.stem / "mask.tif") as mask:
        labels, tags = mask.read(1), mask.tags()
    return labels, json.loads((out / scene.stem / "report.json").read_text()), tags


def test_the_torch_backend_is_a_recorded_choice_that_recomputes_and_agrees(
    crop: Path, buildings_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    reference, report, tags = _run(crop, buildings_model, out, "--engine", "local")
    assert report["crf_backend"] == "pydensecrf" and report["crf_device"] == "cpu"
    assert tags["DEEPLAB_CRF_BACKEND"] == "pydensecrf"
    assert report["crf_reason"].startswith("on as the checkpoint advises: with the tuned CRF mIoU")
    torch_labels, report, tags = _run(
        crop, buildings_model, out, "--engine", "local", "--crf-backend", "torch"
    )
    # the backend is part of the result: the same --out recomputes every core rather than reuse them
    assert report["tiles"]["computed"] == report["tiles"]["total"] > 0
    assert report["crf_backend"] == "torch" and tags["DEEPLAB_CRF_BACKEND"] == "torch"
    assert (torch_labels == reference).mean() >= 0.995
    # in the model's process, on its device (the CPU here): the same labels as the CRF worker's
    fused, report, _ = _run(
        crop, buildings_model, tmp_path / "fused", "--engine", "local", "--crf-device", "gpu"
    )
    assert report["crf_backend"] == "torch" and report["crf_device"] == "gpu"
    np.testing.assert_array_equal(fused, torch_labels)


@pytest.mark.slow
def test_crf_device_gpu_runs_the_crf_inside_the_model_actors_on_ray(
    crop: Path, buildings_model: Path, tmp_path: Path
) -> None:
    local, _, _ = _run(crop, buildings_model, tmp_path / "local", "--engine", "local", "--crf-device", "gpu")
    on_ray, report, _ = _run(
        crop, buildings_model, tmp_path / "ray", "--engine", "ray", "--crf-device", "gpu"
    )
    assert report["cluster"]["actors_started"] == {"model": 1}  # no CRF actors: the model actor refines
    np.testing.assert_array_equal(on_ray, local)


def test_a_checkpoint_whose_crf_did_not_help_runs_without_it_unless_told(
    crop: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "no-crf.safetensors"
    shutil.copy(buildings_model, model)
    verdict = CRFVerdict(
        miou_without=0.52,
        miou_with=0.50,
        boundary_f1_without=0.36,
        boundary_f1_with=0.35,
        miou_gain_interval=(-0.04, 0.001),
        boundary_f1_gain_interval=(-0.02, 0.0),
        resamples=2000,
        images=9,
    )
    assert not verdict.helps
    update_metadata(model, crf_verdict=verdict)
    plain, report, tags = _run(crop, model, tmp_path / "a", "--engine", "local")
    assert report["crf"] is None and "crf_backend" not in report and tags["DEEPLAB_CRF"] == "off"
    assert report["crf_reason"].startswith(
        "off as the checkpoint advises: with the tuned CRF mIoU 0.520 -> 0.500"
    )
    forced, report, _ = _run(crop, model, tmp_path / "b", "--engine", "local", "--crf")
    assert report["crf"] is not None and report["crf_reason"] == "on as asked (--crf)"
    assert (forced != plain).any()
    capsys.readouterr()
    assert main(["segment", str(crop), "--model", str(model), "--out", str(tmp_path / "c"), "--dry-run"]) == 0
    assert "CRF: off (off as the checkpoint advises" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("interval", "helps"),
    [((0.01, 0.06), True), ((-0.002, 0.03), False), ((-0.03, -0.01), False)],
)
def test_the_crf_runs_only_where_its_gain_is_clear_of_the_noise_between_images(
    interval: tuple[float, float], helps: bool
) -> None:
    """A mean gain is not enough: the lower end of the gain's 95% interval must be above zero."""
    verdict = CRFVerdict(
        miou_without=0.5,
        miou_with=0.5 + sum(interval) / 2,
        boundary_f1_without=0.3,
        boundary_f1_with=0.33,
        miou_gain_interval=interval,
        boundary_f1_gain_interval=(0.01, 0.05),
        resamples=2000,
        images=8,
    )
    assert verdict.helps is helps
    assert f"gain 95% interval {interval[0]:+.3f} to {interval[1]:+.3f}" in verdict.describe()


def test_the_paired_bootstrap_separates_a_steady_gain_from_a_gain_of_one_image() -> None:
    """Eight images: a CRF that adds a little everywhere is clear of the noise; one that adds a lot on one
    image and takes a little from each of the others is not: which images were held out decides its sign."""
    truth = np.zeros((8, 20, 20), dtype=np.int64)
    truth[:, 5:15, 5:15] = 1

    def metrics(predictions: list[np.ndarray]) -> list[SegmentationMetrics]:
        out = []
        for prediction, target in zip(predictions, truth, strict=True):
            one = SegmentationMetrics(["background", "object"], 255)
            one.update(prediction, target)
            out.append(one)
        return out

    base = [t.copy() for t in truth]
    for prediction in base:
        prediction[5:15, 5:8] = 0  # each image misses a strip of its object
    steady = [t.copy() for t in truth]
    for prediction in steady:
        prediction[5:15, 5:7] = 0  # the CRF recovers one column of it everywhere
    lucky = [p.copy() for p in base]
    lucky[0] = truth[0].copy()  # all of one image recovered
    for prediction in lucky[1:]:
        prediction[5:15, 8] = 0  # a column lost on each of the others
    bootstrap = PairedBootstrap(resamples=500, seed=1)
    steady_interval, _ = bootstrap.intervals(metrics(base), metrics(steady), [0, 1])
    lucky_interval, _ = bootstrap.intervals(metrics(base), metrics(lucky), [0, 1])
    assert steady_interval[0] > 0
    assert lucky_interval[0] < 0 < lucky_interval[1]
