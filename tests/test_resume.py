"""A run killed mid-scene (SIGKILL: no cleanup of any kind) resumes to a byte-identical mask."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import resume_after_kill

SEGMENT = ["-m", "pipeline.cli", "segment", "--tile", "128", "--halo", "32", "--no-crf"]


def _command(scene: Path, model: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        *SEGMENT,
        str(scene),
        "--model",
        str(model),
        "--out",
        str(out),
        "--force-resolution",
    ]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_bytes(
    landsat: Path, buildings_model: Path, tmp_path: Path
) -> None:
    cwd = Path(__file__).resolve().parents[1]
    reference, resumed = resume_after_kill(
        lambda out: _command(landsat, buildings_model, out), "RGB.byte", "mask.tif", tmp_path, cwd
    )
    assert (resumed / "mask.tif").read_bytes() == (reference / "mask.tif").read_bytes()
