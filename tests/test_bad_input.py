"""Bad input: one error line naming the file and the problem, a non-zero exit, nothing half-written.

The commands run in this process (``pipeline.cli.parser.main``, what the ``deeplab`` entry point calls) with
their output captured: an exception that escapes the CLI's handling fails the test with its traceback.
``test_missing_path`` runs the real entry point in a process of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.cli_runs import one_line_error as _one_line_error
from tests.cli_runs import run_cli as _run
from tests.cli_runs import run_cli_process as _run_process
from tests.conftest import kampala_chip


def _write_like(source: Path, target: Path, array: np.ndarray) -> None:
    with rasterio.open(source) as dataset:
        profile = dataset.profile
    profile.update(count=array.shape[0], height=array.shape[1], width=array.shape[2], dtype=array.dtype.name)
    profile.pop("photometric", None)
    if array.shape[0] != 3:
        profile["photometric"] = "MINISBLACK"  # a 4th band is data (NIR), not alpha
    with rasterio.open(target, "w", **profile) as out:
        out.write(array)


def _pair_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    for folder in (images, masks, out):
        folder.mkdir()
    return images, masks, out


def _train(images: Path, masks: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        "train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--classes",
        "background,building",
        "--arch",
        "deeplabv3_efficientnet_lite0",
        "--epochs",
        "1",
        "--out",
        str(out / "m.safetensors"),
        cwd=cwd,
    )


def test_image_and_mask_of_different_size(kampala: Path, tmp_path: Path) -> None:
    images, masks, out = _pair_folders(tmp_path)
    image, mask = kampala_chip(kampala)
    shutil.copy(image, images / "chip.tif")
    with rasterio.open(mask) as dataset:
        _write_like(mask, masks / "chip.tif", dataset.read()[:, :200, :180])
    line = _one_line_error(_train(images, masks, out, tmp_path), str(images / "chip.tif"), "180x200")
    assert "256x256" in line
    assert list(out.iterdir()) == []


def test_mask_values_above_the_declared_classes(kampala: Path, tmp_path: Path) -> None:
    images, masks, out = _pair_folders(tmp_path)
    image, mask = kampala_chip(kampala)
    shutil.copy(image, images / "chip.tif")
    with rasterio.open(mask) as dataset:
        values = dataset.read()
    values[0, :10, :10] = 3
    _write_like(mask, masks / "chip.tif", values)
    _one_line_error(
        _train(images, masks, out, tmp_path), str(masks / "chip.tif"), "[3]", "2 declared classes"
    )
    assert list(out.iterdir()) == []


def test_missing_path(buildings_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = _run_process(
        "evaluate",
        "--model",
        str(buildings_model),
        "--images",
        str(missing),
        "--masks",
        str(missing),
        "--report",
        str(tmp_path / "r.json"),
        cwd=tmp_path,
    )
    _one_line_error(result, str(missing), "does not exist")
    assert not (tmp_path / "r.json").exists()


def test_a_training_option_out_of_range(kampala: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = _run(
        "train",
        *("--images", str(kampala / "chips"), "--masks", str(kampala / "masks"), "--classes", "a,b"),
        *("--scale-range", "2", "0.5", "--out", str(out / "m.safetensors")),
        cwd=tmp_path,
    )
    _one_line_error(result, "--scale-range", "0 < low <= high")
    assert list(out.iterdir()) == []


def test_a_checkpoint_that_is_not_one(kampala: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is a text file\n" * 10)
    image, _ = kampala_chip(kampala)
    result = _run("segment", str(image), "--model", str(fake), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _one_line_error(result, str(fake), "not a safetensors checkpoint")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tif"))


def test_band_count_that_does_not_match_the_checkpoint(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    image, mask = kampala_chip(kampala)
    four_band = tmp_path / "rgbn.tif"
    with rasterio.open(image) as dataset:
        rgb = dataset.read()
    _write_like(image, four_band, np.concatenate([rgb, rgb[:1]]))
    out = tmp_path / "out"
    result = _run(
        "segment", str(four_band), "--model", str(tiny_buildings_model), "--out", str(out), cwd=tmp_path
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert any(str(four_band) in line and "4 band(s)" in line and "expects 3" in line for line in lines)
    assert not any(out.rglob("*.tif")) if out.exists() else True
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(mask, masks / "rgbn.tif")
    result = _run(
        "evaluate",
        "--model",
        str(tiny_buildings_model),
        "--images",
        str(four_band),
        "--masks",
        str(masks),
        cwd=tmp_path,
    )
    _one_line_error(result, str(four_band), "4 band(s)", "expects 3")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dilation": 2}, "unknown argument(s) ['dilation']"),
        ({"num_classes": 10**9}, "num_classes must be a whole number from 1 to 255"),
        ({"in_channels": 0}, "in_channels must be a whole number from 1 to 64"),
        ({"output_stride": 4}, "output_stride must be 8 or 16"),
    ],
)
def test_a_checkpoint_whose_arch_args_build_model_cannot_take(
    kampala: Path, buildings_model: Path, tmp_path: Path, change: dict[str, int], needle: str
) -> None:
    """A checkpoint is a user's file: its arch_args are checked before a model is built, even in a dry run."""
    from safetensors.numpy import load_file, save_file

    from models.checkpoint import METADATA_KEY, _read_header

    header = _read_header(buildings_model)["__metadata__"]
    metadata = json.loads(header[METADATA_KEY])
    metadata["arch_args"] |= change
    bad = tmp_path / "bad.safetensors"
    save_file(
        load_file(str(buildings_model)), str(bad), metadata=header | {METADATA_KEY: json.dumps(metadata)}
    )
    image, _ = kampala_chip(kampala)
    result = _run(
        "segment", str(image), "--model", str(bad), "--out", str(tmp_path / "out"), "--dry-run", cwd=tmp_path
    )
    _one_line_error(result, str(bad), "arch_args", needle)
    assert result.returncode == 2, "a usage error: nothing can run with this checkpoint"
