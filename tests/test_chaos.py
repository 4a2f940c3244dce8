"""Kills and concurrent runs lose nothing: the driver crashed (SIGKILL) in each of stage, compute and publish,
at a point placed deterministically (``DEEPLAB_CRASH_AT``), resumes to a mask byte-identical to an
uninterrupted run's, with no debris left; two runs into one --out at once end one after the other;
--no-wait refuses with exit code 3; a driver killed alone takes its Ray cluster with it; SIGTERM stops a
run as Ctrl-C does. Random kills, as many as anyone wants: ``python -m bench.chaos``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.chaos import Watched, debris, ray_dirs, scene_crop, segment_argv
from deeplab_common.faults import CRASH_ENV


@pytest.fixture(scope="module")
def crash_reference(
    data_dir: Path, tiny_buildings_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bytes]:
    """The scene and the mask of its uninterrupted run."""
    root = tmp_path_factory.mktemp("crash")
    scene = scene_crop(data_dir, root / "in" / "scene.tif")
    done = subprocess.run(segment_argv(scene, tiny_buildings_model, root / "reference"), capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return scene, (root / "reference" / "scene" / "mask.tif").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "stage"),
    [("stage-block:5", "stage"), ("ledger-core:7", "compute"), ("publish-rename:1", "publish")],
)
def test_a_run_crashed_in_each_stage_resumes_to_the_same_mask(
    crash_reference: tuple[Path, bytes], tiny_buildings_model: Path, tmp_path: Path, crash_at: str, stage: str
) -> None:
    scene, expected = crash_reference
    out = tmp_path / "out"
    crashed = Watched.start(segment_argv(scene, tiny_buildings_model, out), env={CRASH_ENV: crash_at})
    assert crashed.process.wait(timeout=300) == -signal.SIGKILL, crashed.text()
    assert crashed.stage() == stage, crashed.text()
    report = out / "scene" / "report.json"
    assert not report.exists(), "no report: the scene is not published, nor taken for published"
    ledger = out / ".work" / "scene" / "ledger.jsonl"
    if stage == "compute":
        assert len(ledger.read_text().splitlines()) == 7, "every core on record is on the disk"
    resumed = subprocess.run(segment_argv(scene, tiny_buildings_model, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out / "scene" / "mask.tif").read_bytes() == expected
    tiles = json.loads(report.read_text())["tiles"]
    assert tiles["resumed"] == (7 if stage == "compute" else 0 if stage == "stage" else tiles["total"])
    assert tiles["computed"] == tiles["total"] - tiles["resumed"]
    assert not debris(out), debris(out)


@pytest.mark.slow
def test_two_runs_into_one_folder_take_turns_and_no_wait_refuses(
    data_dir: Path, buildings_model: Path, tmp_path: Path
) -> None:
    first_scene = scene_crop(data_dir, tmp_path / "a" / "first.tif", 768)  # long enough to be waited for
    second_scene = scene_crop(data_dir, tmp_path / "b" / "second.tif")
    out = tmp_path / "out"
    first = Watched.start(segment_argv(first_scene, buildings_model, out))
    first.wait_for("first stage")
    second = Watched.start(segment_argv(second_scene, buildings_model, out))
    refused = subprocess.run(
        segment_argv(second_scene, buildings_model, out, "--no-wait"), capture_output=True, text=True
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
    assert not debris(out)


@pytest.mark.slow
def test_a_driver_killed_alone_takes_its_ray_cluster_with_it(
    crash_reference: tuple[Path, bytes], tiny_buildings_model: Path, tmp_path: Path
) -> None:
    """The driver alone crashed (SIGKILL to it, not its process group) while its own local Ray cluster
    computes: the engine's Ray processes exit with it, and the next run removes its Ray temp dir and resumes
    the cores it recorded, to the mask of the uninterrupted (in-process) run."""
    from pipeline.ray.local_cluster import processes_mentioning

    scene, expected = crash_reference
    out = tmp_path / "o"
    on_ray = [arg if arg != "local" else "ray" for arg in segment_argv(scene, tiny_buildings_model, out)]
    crashed = Watched.start(on_ray, env={CRASH_ENV: "ledger-core:5"})
    assert crashed.process.wait(timeout=300) == -signal.SIGKILL, crashed.text()
    deadline = time.monotonic() + 60
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(str(out)), "no Ray process outlives its driver"
    assert ray_dirs(out), "its Ray temp dir is left for the next run"
    resumed = subprocess.run(on_ray, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "leftover(s) of an interrupted run" in resumed.stdout + resumed.stderr
    assert not debris(out)
    assert json.loads((out / "scene" / "report.json").read_text())["tiles"]["resumed"] == 5
    assert (out / "scene" / "mask.tif").read_bytes() == expected, "the Ray engine's mask is the local one's"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "stop_at"), [("local", "stage-block:5:TERM"), ("ray", "ledger-core:5:TERM")]
)
def test_sigterm_stops_a_run_as_ctrl_c_does(
    crash_reference: tuple[Path, bytes], tiny_buildings_model: Path, tmp_path: Path, engine: str, stop_at: str
) -> None:
    """SIGTERM (Kubernetes, Prefect, ``timeout``) in staging on the local engine and in compute on Ray: one
    line, exit 143, the run's partial outputs removed and its lock released, no Ray process of the run left,
    and the next run resumes to the uninterrupted mask."""
    from pipeline.ray.local_cluster import processes_mentioning

    scene, expected = crash_reference
    out = tmp_path / "o"
    argv = [arg if arg != "local" else engine for arg in segment_argv(scene, tiny_buildings_model, out)]
    stopped = Watched.start(argv, env={CRASH_ENV: stop_at})
    assert stopped.process.wait(timeout=300) == 143, stopped.text()
    printed = stopped.text()
    assert "Traceback" not in printed and "SIGTERM received" not in printed, printed
    assert printed.strip().splitlines()[-1] == "terminated (SIGTERM): stopped; a re-run resumes", printed
    assert "partial output(s) removed" in printed
    assert not debris(out), "nothing partial is left for the next run to clean"
    assert not processes_mentioning(str(out)), "no Ray process outlives the run"
    # the lock is free (--no-wait), and the ledger holds: resumed on the local engine (no second Ray start;
    # the engines' masks are equal, test_a_driver_killed_alone_takes_its_ray_cluster_with_it)
    local = [arg if arg != "ray" else "local" for arg in argv]
    resumed = subprocess.run([*local, "--no-wait"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "leftover(s)" not in resumed.stdout + resumed.stderr
    assert (out / "scene" / "mask.tif").read_bytes() == expected
    if engine == "ray":
        assert json.loads((out / "scene" / "report.json").read_text())["tiles"]["resumed"] >= 5
