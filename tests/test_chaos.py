"""Kills and concurrent runs lose nothing: the driver SIGKILLed at 10 random points in stage, segment and
publish, each resumed to a mask byte-identical to an uninterrupted run's, with no debris left; two runs into
one --out at once end one after the other; --no-wait refuses with exit code 3."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import rasterio
from rasterio.windows import Window

from pipeline.engine.outdir import RAY_OWNER

ROOT = Path(__file__).resolve().parents[1]
DEEPLAB = str(Path(sys.executable).parent / "deeplab")
FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]
STAGES = ("stage", "compute", "publish")


def _scene(data_dir: Path, out: Path, size: int = 384) -> Path:
    with rasterio.open(data_dir / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif") as source:
        window = Window(600, 400, size, size)
        profile = source.profile | {
            "height": size,
            "width": size,
            "transform": source.window_transform(window),
            "compress": "deflate",
            "photometric": "rgb",
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **profile) as sink:
            sink.write(source.read(window=window))
    return out


@dataclass
class Watched:
    """A `deeplab segment` subprocess whose output lines are read as they come, with their times."""

    process: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def start(cls, argv: list[str]) -> Watched:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        watched = cls(process)
        threading.Thread(target=watched._read, daemon=True).start()
        return watched

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait_for(self, marker: str, timeout: float = 300) -> float:
        """The time the first line containing ``marker`` came; raises if the run ended without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if marker in line:
                    return at
            if self.process.poll() is not None and not any(marker in line for _, line in self.lines):
                time.sleep(0.2)  # the reader may still hold the last lines
                if not any(marker in line for _, line in self.lines):
                    raise AssertionError(f"no line with {marker!r}:\n{self.text()}")
            time.sleep(0.01)
        raise TimeoutError(marker)

    def kill(self) -> str:
        """SIGKILL the driver (the run's whole process group); returns the stage it was in."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        stages = [line.split()[1].rstrip(":") for _, line in self.lines if len(line.split()) > 1]
        return next((s for s in reversed(stages) if s in (*STAGES, "done")), "start")

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _segment(scene: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [DEEPLAB, "segment", str(scene), "--model", str(model), "--out", str(out), *FAST, *extra]


def _ray_dirs(out: Path) -> list[Path]:
    """The Ray temp dirs of runs into ``out``: under its work folder, or (a path too long for Ray's
    sockets) in the system's temp dir, naming ``out`` as their owner."""
    owned = [
        folder
        for folder in Path(tempfile.gettempdir()).glob("deeplab-ray-*")
        if (folder / RAY_OWNER).is_file()
        and (folder / RAY_OWNER).read_text().splitlines()[0] == str(out.resolve())
    ]
    return [*(out / ".work").glob("ray-*"), *owned]


def _debris(out: Path) -> list[Path]:
    return [*out.rglob(".partial-*"), *_ray_dirs(out)]


@pytest.mark.slow
def test_a_run_killed_at_10_random_points_resumes_to_the_same_mask(
    data_dir: Path, buildings_model: Path, tmp_path: Path
) -> None:
    scene = _scene(data_dir, tmp_path / "in" / "scene.tif")
    reference = Watched.start(_segment(scene, buildings_model, tmp_path / "reference"))
    assert reference.process.wait(timeout=600) == 0, reference.text()
    # each stage's span in the uninterrupted run: kills land at random points inside them
    starts = {stage: reference.wait_for(f"scene {stage}") for stage in STAGES}
    ends = {
        "stage": starts["compute"],
        "compute": starts["publish"],
        "publish": reference.wait_for("scene done"),
    }
    expected = (tmp_path / "reference" / "scene" / "mask.tif").read_bytes()

    chance = random.Random(20)
    plan = ["stage"] * 3 + ["compute"] * 4 + ["publish"] * 3
    landed: list[str] = []
    # each killed run's resume runs while the next run is started and killed (at most one resume at a
    # time): the trials cost half the wall time, and a busier CPU only stretches the stages the kills aim at
    resuming: tuple[int, Path, subprocess.Popen[str]] | None = None
    for trial, stage in enumerate(plan):
        out = tmp_path / f"killed-{trial}"
        run = Watched.start(_segment(scene, buildings_model, out))
        entered = run.wait_for(f"scene {stage}")
        delay = chance.uniform(0, 0.6 * (ends[stage] - starts[stage]))  # well inside the stage
        time.sleep(max(0.0, delay - (time.monotonic() - entered)))
        landed.append(run.kill())
        if resuming is not None:
            _check_resumed(*resuming, expected, landed)
        resume = subprocess.Popen(
            _segment(scene, buildings_model, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        resuming = (trial, out, resume)
    assert resuming is not None
    _check_resumed(*resuming, expected, landed)
    assert {"stage", "compute", "publish"} <= set(landed), landed


def _check_resumed(
    trial: int, out: Path, resume: subprocess.Popen[str], expected: bytes, landed: list[str]
) -> None:
    printed = resume.communicate(timeout=600)[0]
    assert resume.returncode == 0, printed
    assert (out / "scene" / "mask.tif").read_bytes() == expected, f"kill {trial} in {landed[trial]}"
    assert not _debris(out), f"kill {trial} in {landed[trial]} left {_debris(out)}"


@pytest.mark.slow
def test_two_runs_into_one_folder_take_turns_and_no_wait_refuses(
    data_dir: Path, buildings_model: Path, tmp_path: Path
) -> None:
    first_scene = _scene(data_dir, tmp_path / "a" / "first.tif", 768)  # long enough to be waited for
    second_scene = _scene(data_dir, tmp_path / "b" / "second.tif")
    out = tmp_path / "out"
    first = Watched.start(_segment(first_scene, buildings_model, out))
    first.wait_for("first stage")
    second = Watched.start(_segment(second_scene, buildings_model, out))
    refused = subprocess.run(
        _segment(second_scene, buildings_model, out, "--no-wait"), capture_output=True, text=True
    )
    assert first.process.poll() is None, "the first run still held the folder"
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "another run is writing into this folder" in refused.stdout + refused.stderr
    assert f"pid {first.process.pid}" in refused.stdout + refused.stderr, "names the run that holds it"
    assert second.process.wait(timeout=600) == 0 and first.process.wait(timeout=600) == 0
    assert "waiting for it" in second.text(), second.text()
    # one after the other: the second staged nothing before the first was done
    assert second.wait_for("second stage") > first.wait_for("first done")
    for name in ("first", "second"):
        assert (out / name / "mask.tif").is_file() and (out / name / "report.json").is_file()
    assert not _debris(out)


@pytest.mark.slow
def test_a_driver_killed_alone_takes_its_ray_cluster_with_it(
    data_dir: Path, buildings_model: Path, tmp_path: Path
) -> None:
    """SIGKILL to the driver alone (not its process group): the engine's own Ray processes exit with it,
    and the next run removes its Ray temp dir and resumes the cores it recorded."""
    from pipeline.ray.local_cluster import processes_mentioning

    scene = _scene(data_dir, tmp_path / "in" / "scene.tif")
    out = tmp_path / "o"
    on_ray = [arg if arg != "local" else "ray" for arg in _segment(scene, buildings_model, out)]
    run = Watched.start(on_ray)
    run.wait_for("cores (")
    os.kill(run.process.pid, signal.SIGKILL)
    run.process.wait()
    deadline = time.monotonic() + 60
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(out)), "no Ray process outlives its driver"
    assert _ray_dirs(out), "its Ray temp dir is left for the next run"
    resumed = subprocess.run(_segment(scene, buildings_model, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "leftover(s) of an interrupted run" in resumed.stdout + resumed.stderr
    assert not _debris(out)
    reference = subprocess.run(_segment(scene, buildings_model, tmp_path / "ref"), capture_output=True)
    assert reference.returncode == 0
    assert (out / "scene" / "mask.tif").read_bytes() == (tmp_path / "ref" / "scene" / "mask.tif").read_bytes()
