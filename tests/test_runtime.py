"""The model's runtimes: ONNX Runtime against eager on real windows, the choice between them, the export
cache, and the engine's default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from pydantic import ValidationError

from deeplab_common.errors import ConfigError
from models.registry import ARCHITECTURES
from models.runtime import CACHE_ENV, ONNX_ON_CPU, choose_runtime, export_path
from pipeline.cli import main
from pipeline.engine.options import SegmentOptions, is_runtime
from pipeline.engine.workers import ModelWorker
from tests.conftest import ROOT, kampala_chip

LITE0 = "deeplabv3plus_efficientnet_lite0"
LITE2 = "deeplabv3plus_efficientnet_lite2"


def _windows(kampala: Path) -> list[list[np.ndarray]]:
    """Batches of real windows in two shapes: the engine's full window and a smaller edge window."""
    with rasterio.open(kampala / "scene" / "kampala_z21_rgb.tif") as source:
        image = source.read((1, 2, 3), window=((512, 1792), (512, 1792)))
    full = [image[:, :640, :640], image[:, 640:, 640:]]
    edge = [image[:, :320, 100:580]]  # 320 x 480: not the exported example's shape
    return [full, edge]


@pytest.mark.slow
def test_onnxruntime_gives_eager_labels_on_real_windows(
    kampala: Path, buildings_model: Path, shared_onnx_cache: Path
) -> None:
    eager = ModelWorker(str(buildings_model), device="cpu", threads=2, amp=False, runtime="eager")
    onnx = ModelWorker(
        str(buildings_model),
        device="cpu",
        threads=2,
        amp=False,
        loaded=eager.loaded,
        runtime="onnxruntime",
        onnx_cache=str(shared_onnx_cache),
    )
    assert (eager.runtime_name(), onnx.runtime_name()) == ("eager", "onnxruntime")
    full, edge = _windows(kampala)
    # full windows as the engine runs them; the edge window also through test-time views (strided,
    # transposed inputs) at two input scales
    for windows, scales, tta in ((full, (1.0,), "none"), (edge, (0.75, 1.0), "d4")):
        expected = eager._probabilities(windows, scales, "max", None, tta)
        got = onnx._probabilities(windows, scales, "max", None, tta)
        assert got.shape == expected.shape == (len(windows), 2, *windows[0].shape[1:])
        assert float((got - expected).abs().max()) < 1e-3
        agreement = float((got.argmax(1) == expected.argmax(1)).float().mean())
        assert agreement >= 0.999, (scales, tta, agreement)


@pytest.mark.slow
def test_torch_compile_gives_eager_labels(kampala: Path, buildings_model: Path) -> None:
    eager = ModelWorker(str(buildings_model), device="cpu", threads=2, amp=False, runtime="eager")
    compiled = ModelWorker(
        str(buildings_model), device="cpu", threads=2, amp=False, loaded=eager.loaded, runtime="compile"
    )
    assert compiled.runtime_name() == "compile"
    windows = _windows(kampala)[0]
    expected = eager._probabilities(windows, (1.0,), "max", None, "none")
    got = compiled._probabilities(windows, (1.0,), "max", None, "none")
    assert float((got - expected).abs().max()) < 1e-3
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.999


def test_the_runtime_is_onnxruntime_where_it_was_measured_faster_on_the_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_runtime(None, cpu, LITE0) == "onnxruntime"
    assert choose_runtime(None, cpu, LITE2) == "eager"  # 1.14x: under the bar
    assert choose_runtime(None, cuda, LITE0) == "eager"  # ONNX Runtime's CPU provider only
    assert choose_runtime("eager", cpu, LITE0) == "eager"
    assert choose_runtime("onnxruntime", cpu, LITE2) == "onnxruntime"
    assert choose_runtime("compile", cuda, LITE0) == "compile"  # torch.compile runs on any device
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose_runtime("onnxruntime", cuda, LITE0)
    with pytest.raises(ConfigError, match="unknown runtime"):
        choose_runtime("tensorrt", cpu, LITE0)


def test_the_cpu_default_is_the_benchmarks_verdict() -> None:
    """``ONNX_ON_CPU`` holds the architectures bench/runtimes.py measured at least 1.3x eager with equal
    labels, and no other: the code follows the report, which is re-measured when the models change."""
    report = json.loads((ROOT / "bench" / "reports" / "runtimes.json").read_text())
    adopted = {r["architecture"] for r in report["results"] if r["runtimes"]["onnxruntime"].get("adopt")}
    measured = {r["architecture"] for r in report["results"]}
    assert adopted == ONNX_ON_CPU
    assert set(ARCHITECTURES) >= ONNX_ON_CPU and len(measured) >= 3


def test_runtime_options_are_outside_the_result_key_and_checked() -> None:
    # the same masks up to float rounding, as with --device: changing them redoes nothing
    assert is_runtime("runtime") and is_runtime("onnx_cache")
    with pytest.raises(ValidationError, match="runs on the CPU"):
        SegmentOptions(runtime="onnxruntime", device="cuda:0")
    with pytest.raises(ValidationError, match="--context scene needs --runtime eager"):
        SegmentOptions(runtime="onnxruntime", context="scene")
    assert SegmentOptions(context="scene").runtime is None  # the engine then runs eager


@pytest.mark.slow
def test_the_engine_runs_onnxruntime_by_default_with_its_export_beside_the_work_folder(
    kampala: Path, buildings_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CACHE_ENV)  # the default place, not the session's shared cache
    chip, _ = kampala_chip(kampala)
    out = tmp_path / "out"
    common = [str(chip), "--model", str(buildings_model), "--engine", "local", "--no-crf", "--halo", "32"]
    assert main(["segment", *common, "--out", str(out), "--tile", "128"]) == 0
    report = json.loads((out / chip.stem / "report.json").read_text())
    assert report["runtime"] == "onnxruntime"
    cache = out / ".work" / ".onnx"
    exports = list(cache.glob("*.onnx"))  # one file, under its final name: no partial left
    assert [p.name for p in exports] == [export_path(Path(), report["checkpoint_sha256"]).name]
    assert not [p for p in cache.iterdir() if p.name.startswith(".partial")]
    assert exports[0].stat().st_size > 1_000_000
    stamp = exports[0].stat().st_mtime_ns
    # another tiling is another result key: computed again, with the same export, loaded and not rewritten
    assert main(["segment", *common, "--out", str(out), "--tile", "256"]) == 0
    assert json.loads((out / chip.stem / "report.json").read_text())["tiles"]["computed"] == 1
    assert exports[0].stat().st_mtime_ns == stamp

    eager = tmp_path / "eager"
    assert main(["segment", *common, "--out", str(eager), "--tile", "256", "--runtime", "eager"]) == 0
    assert json.loads((eager / chip.stem / "report.json").read_text())["runtime"] == "eager"
    assert not (eager / ".work" / ".onnx").exists()
    with (
        rasterio.open(out / chip.stem / "mask.tif") as onnx_mask,
        rasterio.open(eager / chip.stem / "mask.tif") as eager_mask,
    ):
        assert float((onnx_mask.read(1) == eager_mask.read(1)).mean()) >= 0.999
