"""What refuses a whole run before any work (issue 32): a checkpoint checked whole, an input that names no
scene, an output folder that cannot be written, options out of range, and `deeplab run-flow` with a missing
model before any server starts. Each is one line naming the file or flag, exit 2, and nothing written."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint, save_checkpoint
from tests.cli_runs import one_line_error, run_cli, run_cli_process
from tests.conftest import kampala_chip

FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]


def _header_and_body(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header: dict, body: bytes) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def _bad_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Each broken checkpoint with a phrase its refusal says."""
    header, body = _header_and_body(good)
    weight = next(name for name in header if name.endswith("weight"))
    cases: dict[str, tuple[Path, str]] = {}
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) - 100])
    cases["truncated"] = (truncated, "truncated")
    huge = json.loads(json.dumps(header))
    huge[weight]["shape"] = [1_000_000, 1_000_000]  # 10^12 elements claimed
    cases["huge"] = (_write(folder / "huge.safetensors", huge, body), "needs 4000000000000 bytes")
    # the case: half-precision weights relabelled to another 2-byte dtype (the sizes still agree)
    loaded = load_checkpoint(good)
    half = save_checkpoint(folder / "half.safetensors", loaded.model, loaded.metadata, half=True)
    half_header, half_body = _header_and_body(half)
    for code in ("BF16", "I16"):
        relabelled = json.loads(json.dumps(half_header))
        for name, entry in relabelled.items():
            if name != "__metadata__" and entry["dtype"] == "F16":
                entry["dtype"] = code
        path = _write(folder / f"relabel-{code}.safetensors", relabelled, half_body)
        cases[code] = (path, f"is {code} but the checkpoint's weights are float16")
    deep = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (folder / "deep.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    cases["deep"] = (folder / "deep.safetensors", "nested too deep")
    os.mkfifo(folder / "fifo.safetensors")
    cases["fifo"] = (folder / "fifo.safetensors", "not a regular file")
    return cases


def test_a_checkpoint_is_checked_whole_before_any_scene(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    chip, _ = kampala_chip(kampala)
    for name, (checkpoint, phrase) in _bad_checkpoints(tiny_buildings_model, tmp_path).items():
        out = tmp_path / f"out-{name}"
        clock = time.perf_counter()
        result = run_cli(
            "segment", str(chip), "--model", str(checkpoint), "--out", str(out), *FAST, cwd=tmp_path
        )
        assert result.returncode == 2, (name, result.stderr)
        one_line_error(result, str(checkpoint), phrase)
        assert not out.exists(), f"{name}: nothing written before the checkpoint is known good"
        assert time.perf_counter() - clock < 30, f"{name}: refused at once, not after a hang"


def test_an_input_that_names_no_scene_is_a_usage_error(tiny_buildings_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "incoming"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a raster")
    for given, phrase in (
        (str(tmp_path / "missing-night" / "*.tif"), "the glob names no raster file"),
        (str(empty), "the folder names no raster file"),
    ):
        out = tmp_path / "out"
        result = run_cli(
            "segment", given, "--model", str(tiny_buildings_model), "--out", str(out), cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr
        one_line_error(result, given, phrase)
        assert not out.exists(), "a run of no scenes records nothing"


def test_an_output_folder_that_cannot_be_written_is_one_line(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    chip, _ = kampala_chip(kampala)
    for out in ("/proc/deeplab-out", "/sys/deeplab-out"):
        result = run_cli(
            "segment", str(chip), "--model", str(tiny_buildings_model), "--out", out, cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr
        one_line_error(result, f"--out {out}", "cannot be written")


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--scales", "0"], "--scales: scales must lie in 0.1-4 (got 0)"),
        (["--scales", "1", "-1"], "--scales: scales must lie in 0.1-4"),
        (["--scales", "nan"], "(got nan)"),
        (["--scales", "inf"], "(got inf)"),
        (["--tile", "100000"], "--tile 100000: one model call holds 4 window(s)"),
    ],
)
def test_options_out_of_range_are_usage_errors_naming_the_flag(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path, flags: list[str], phrase: str
) -> None:
    chip, _ = kampala_chip(kampala)
    out = tmp_path / "out"
    result = run_cli(
        "segment", str(chip), "--model", str(tiny_buildings_model), "--out", str(out), "--engine", "local",
        *flags, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    one_line_error(result, phrase)
    assert not out.exists()


def test_run_flow_checks_the_model_before_any_server_starts(kampala: Path, tmp_path: Path) -> None:
    chip, _ = kampala_chip(kampala)
    work = tmp_path / "prefect-work"
    missing = tmp_path / "no-such-model.safetensors"
    clock = time.perf_counter()
    result = run_cli_process(
        "run-flow", str(chip), "--model", str(missing), "--out", str(tmp_path / "out"),
        "--work-dir", str(work), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    one_line_error(result, str(missing), "checkpoint not found")
    assert not work.exists(), "no Prefect server was started (its home is made first)"
    assert time.perf_counter() - clock < 60
