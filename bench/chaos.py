"""Random kills: `deeplab segment` SIGKILLed at random points inside its stage, compute and publish stages,
each run resumed; every resumed mask must be byte-identical to an uninterrupted run's, with no debris left.

The test suite places one kill in each stage deterministically (``DEEPLAB_CRASH_AT``, tests/test_chaos.py);
this runs as many random ones as asked, for as long as anyone cares to run it:

    python -m bench.chaos --kills 30 --seed 7    # bench/reports/chaos.{json,md}; exits 1 on any difference

Each killed run's resume runs while the next run is started and killed (at most one resume at a time): the
trials cost about half the wall time, and a busier CPU only stretches the stages the kills aim at.
"""

from __future__ import annotations

import argparse
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
from typing import Any

import rasterio
from rasterio.windows import Window

from pipeline.engine.outdir import RAY_OWNER

ROOT = Path(__file__).resolve().parents[1]
DEEPLAB = str(Path(sys.executable).parent / "deeplab")
FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]
STAGES = ("stage", "compute", "publish")


def scene_crop(data_dir: Path, out: Path, size: int = 384) -> Path:
    """A ``size``² crop of the real Kampala scene, as its own GeoTIFF."""
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


def segment_argv(scene: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [DEEPLAB, "segment", str(scene), "--model", str(model), "--out", str(out), *FAST, *extra]


@dataclass
class Watched:
    """A `deeplab segment` subprocess whose output lines are read as they come, with their times."""

    process: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str] | None = None) -> Watched:
        environment = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"} | (env or {})
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
            start_new_session=True,
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
        return self.stage()

    def stage(self) -> str:
        """The last stage the run's progress lines named."""
        stages = [line.split()[1].rstrip(":") for _, line in self.lines if len(line.split()) > 1]
        return next((s for s in reversed(stages) if s in (*STAGES, "done")), "start")

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def ray_dirs(out: Path) -> list[Path]:
    """The Ray temp dirs of runs into ``out``: under its work folder, or (a path too long for Ray's
    sockets) in the system's temp dir, naming ``out`` as their owner."""
    owned = [
        folder
        for folder in Path(tempfile.gettempdir()).glob("deeplab-ray-*")
        if (folder / RAY_OWNER).is_file()
        and (folder / RAY_OWNER).read_text().splitlines()[0] == str(out.resolve())
    ]
    return [*(out / ".work").glob("ray-*"), *owned]


def debris(out: Path) -> list[Path]:
    """What an interrupted run may leave that a finished one must not: partial folders, Ray temp dirs."""
    return [*out.rglob(".partial-*"), *ray_dirs(out)]


def random_kills(scene: Path, model: Path, work: Path, kills: int, seed: int) -> list[dict[str, Any]]:
    """``kills`` runs SIGKILLed at random points, spread over the stages, each resumed and checked."""
    reference = Watched.start(segment_argv(scene, model, work / "reference"))
    if reference.process.wait(timeout=600) != 0:
        raise RuntimeError(reference.text())
    # each stage's span in the uninterrupted run: kills land at random points well inside them
    starts = {stage: reference.wait_for(f"{scene.stem} {stage}") for stage in STAGES}
    ends = {"stage": starts["compute"], "compute": starts["publish"], "publish": reference.wait_for("done")}
    expected = (work / "reference" / scene.stem / "mask.tif").read_bytes()
    chance = random.Random(seed)
    aims = [STAGES[index % len(STAGES)] for index in range(kills)]
    trials: list[dict[str, Any]] = []
    resuming: tuple[dict[str, Any], Path, subprocess.Popen[str]] | None = None
    for index, aim in enumerate(aims):
        out = work / f"killed-{index}"
        run = Watched.start(segment_argv(scene, model, out))
        entered = run.wait_for(f"{scene.stem} {aim}")
        delay = chance.uniform(0, 0.6 * (ends[aim] - starts[aim]))
        time.sleep(max(0.0, delay - (time.monotonic() - entered)))
        trial = {"aimed_at": aim, "delay_s": round(delay, 3), "landed_in": run.kill()}
        trials.append(trial)
        if resuming is not None:
            _check(*resuming, scene.stem, expected)
        resume = subprocess.Popen(
            segment_argv(scene, model, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        resuming = (trial, out, resume)
    if resuming is not None:
        _check(*resuming, scene.stem, expected)
    return trials


def _check(
    trial: dict[str, Any], out: Path, resume: subprocess.Popen[str], name: str, expected: bytes
) -> None:
    printed = resume.communicate(timeout=600)[0]
    trial["resumed_exit_code"] = resume.returncode
    mask = out / name / "mask.tif"
    trial["identical"] = resume.returncode == 0 and mask.is_file() and mask.read_bytes() == expected
    trial["debris"] = [str(path) for path in debris(out)]
    if resume.returncode != 0:
        trial["output"] = printed[-2000:]


def main() -> int:
    from bench.reporting import machine, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--model", type=Path, default=ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors"
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeplab-chaos-") as folder:
        work = Path(folder)
        scene = scene_crop(args.data, work / "in" / "scene.tif")
        trials = random_kills(scene, args.model, work, args.kills, args.seed)
    bad = [t for t in trials if not t["identical"] or t["debris"]]
    result = {"machine": machine(), "model": args.model.name, "seed": args.seed, "trials": trials}
    lines = [
        "# Random kills (`python -m bench.chaos`)",
        "",
        f"{len(trials)} runs of a 384² Kampala crop ({args.model.name}, {' '.join(FAST)}) SIGKILLed at "
        f"random points (seed {args.seed}), each resumed: {len(trials) - len(bad)} identical, no debris.",
        "",
        "| # | aimed at | landed in | delay (s) | resumed identical | debris |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {i} | {t['aimed_at']} | {t['landed_in']} | {t['delay_s']} | {t['identical']} "
            f"| {len(t['debris'])} |"
            for i, t in enumerate(trials)
        ),
    ]
    write_report("chaos", result, lines)
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
