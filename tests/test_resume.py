"""A run killed mid-scene (SIGKILL: no cleanup of any kind) resumes to a byte-identical mask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEGMENT = ["-m", "pipeline.cli", "segment", "--tile", "128", "--halo", "32", "--no-crf"]


def _command(scene: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, *SEGMENT, str(scene), "--model", str(model), "--out", str(out)]


def _recorded(ledger: Path) -> int:
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_bytes(
    landsat: Path, buildings_model: Path, tmp_path: Path
) -> None:
    cwd = Path(__file__).resolve().parents[1]
    reference = tmp_path / "reference"
    subprocess.run(_command(landsat, buildings_model, reference), cwd=cwd, check=True, capture_output=True)
    expected = (reference / "RGB.byte" / "mask.tif").read_bytes()
    total = json.loads((reference / "RGB.byte" / "report.json").read_text())["tiles"]["computed"]

    out = tmp_path / "killed"
    ledger = out / ".work" / "RGB.byte" / "ledger.jsonl"
    # Its own session: the kill takes the driver and the local Ray cluster it started, all at once.
    run = subprocess.Popen(
        _command(landsat, buildings_model, out),
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while _recorded(ledger) < 5 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    done_before = _recorded(ledger)
    assert 5 <= done_before < total, "killed mid-scene"
    assert not (out / "RGB.byte" / "mask.tif").exists(), "nothing half-published"

    subprocess.run(_command(landsat, buildings_model, out), cwd=cwd, check=True, capture_output=True)
    report = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert report["tiles"]["resumed"] >= done_before
    assert report["tiles"]["computed"] == total - report["tiles"]["resumed"]
    assert (out / "RGB.byte" / "mask.tif").read_bytes() == expected
