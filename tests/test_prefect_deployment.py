"""`deeplab serve` + `prefect deployment run segment-scenes/nightly`, for real, then the same flow twice more
through `deeplab run-flow` against the same server.

A real Prefect server (SQLite, free port, temporary PREFECT_HOME), the real work pool and worker, the
deployments created from prefect.yaml by `prefect deploy`, and the real flow on Ray over two real scenes
from ../shared/data plus a corrupt file, through the tiny model with the building model's metadata. Then
the flow function in a process of its own (no deployment, no worker): a re-run skips both scenes (nothing
staged, computed or rewritten), and after one input changes only that one is redone. Every process is
stopped by its PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import rasterio

from bench.chaos import ray_dirs
from flows.serve import free_port
from flows.settings import prefect_environment
from tests.conftest import ROOT, kampala_chip

SERVE_READY_S = 300
RUN_TIMEOUT_S = 600


def _digests(folder: Path) -> dict[str, str]:
    """Every published file (not the work folder, not the failed scenes' logs, not the manifest: each run
    adds to those)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not {".work", ".logs"} & set(p.parts) and not p.name.startswith((".", "manifest"))
    }


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _run_nightly(env: dict[str, str], incoming: Path) -> tuple[str, str]:
    command = [
        sys.executable,
        "-m",
        "prefect",
        "deployment",
        "run",
        "segment-scenes/nightly",
        "--param",
        f"input={incoming}",
        "--watch",
        "--watch-timeout",
        str(RUN_TIMEOUT_S),
    ]
    done = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60
    )
    match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert match, f"no flow run created:\n{done.stdout}\n{done.stderr}"
    return match.group(1), done.stdout


def _run_flow(env: dict[str, str], incoming: Path, model: Path, out: Path, work: Path) -> str:
    """`deeplab run-flow` on the server of ``env`` (PREFECT_API_URL): the flow in this new process, as
    `make demo` runs it; returns the flow run's id, as the manifest records it."""
    command = [sys.executable, "-m", "flows.cli", "run-flow", str(incoming), "--model", str(model)]
    # --engine local: a runtime option, outside the result key, so these runs keep the deployment's keys
    command += ["--out", str(out), "--work-dir", str(work), "--force-resolution", "--engine", "local"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, f"the corrupt file fails the run:\n{done.stdout}\n{done.stderr}"
    run_id: str = json.loads((out / "manifest.json").read_text())["runs"][-1]["flow_run_id"]
    return run_id


def _readback(env: dict[str, str], *run_ids: str) -> dict[str, Any]:
    probe = [sys.executable, str(ROOT / "tests" / "prefect_readback.py"), *run_ids]
    done = subprocess.run(probe, env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _last_run(out: Path) -> dict[str, dict[str, Any]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {scene["scene_id"]: scene for scene in manifest["runs"][-1]["scenes"]}


def _wait_ready(serve: subprocess.Popen[bytes], state_file: Path, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + SERVE_READY_S
    while not state_file.exists():
        assert serve.poll() is None, f"deeplab serve exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"deeplab serve not ready:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    state: dict[str, Any] = json.loads(state_file.read_text())
    return state


def _stop(serve: subprocess.Popen[bytes]) -> None:
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_mask(mask: Path, source: Path) -> None:
    with rasterio.open(mask) as out, rasterio.open(source) as src:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        labels, valid, nodata = out.read(1), src.dataset_mask() > 0, out.nodata
    assert set(np.unique(labels[valid])) <= {0, 1}, "background/building where the scene has data"
    assert (labels[~valid] == nodata).all(), "nodata where it has none"


@pytest.mark.slow
def test_nightly_deployment_runs_skips_and_redoes(
    kampala: Path, landsat: Path, tiny_buildings_model: Path, tmp_path: Path, s3: Any
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    chip = incoming / "kampala.tif"
    shutil.copy(kampala_chip(kampala)[0], chip)
    shutil.copy(landsat, incoming / "landsat.tif")
    (incoming / "corrupt.tif").write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(4000))
    out, work = tmp_path / "published", tmp_path / "work"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    serve_env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1"}
    command = [sys.executable, "-m", "flows.cli", "serve", "--work-dir", str(work), "--port", str(port)]
    command += ["--output", str(out), "--model", str(tiny_buildings_model), "--timezone", "Europe/Berlin"]
    command += ["--options", '{"force_resolution": true}']  # the 300 m Landsat scene, the 7.5 cm model
    with open(log, "wb") as sink:
        serve = subprocess.Popen(
            command, cwd=ROOT, env=serve_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    started: set[int] = set()
    try:
        state = _wait_ready(serve, work / "prefect" / "serve.json", log)
        started = {serve.pid, *state["pids"].values()}
        env = prefect_environment(work, api_url)

        # the schedule and the deployments, as the server holds them
        deployments = _readback(env)["deployments"]
        nightly = deployments["segment-scenes/nightly"]
        assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "Europe/Berlin", "active": True}]
        assert nightly["work_pool"] == "deeplab"
        assert nightly["parameters"]["output"] == str(out)
        assert deployments["segment-scenes/on-demand"]["schedules"] == []

        # 1: both scenes published, the corrupt file reported, the run failed because of it alone
        first, _ = _run_nightly(env, incoming)
        started |= {p.pid for p in psutil.Process(serve.pid).children(recursive=True)}
        run = _readback(env, first)["runs"][first]
        assert run["state"] == "FAILED"
        assert "1 of 3 scene(s) failed" in run["message"]
        assert f"{incoming / 'corrupt.tif'}: not a readable raster" in run["message"]
        _check_mask(out / "kampala" / "mask.tif", chip)
        _check_mask(out / "landsat" / "mask.tif", landsat)
        outcomes = _last_run(out)
        assert {k: v["outcome"] for k, v in outcomes.items()} == {
            "kampala": "done",
            "landsat": "done",
            "corrupt": "failed",
        }
        assert outcomes["landsat"]["tiles"]["computed"] == 4
        artifacts = {a["key"]: a for a in run["artifacts"]}
        table = artifacts["segment-scenes-report"]
        assert table["type"] == "markdown"
        assert re.search(
            r"\| kampala \| done \| 1 / 0 / 0 \| background [\d.,]+ ha, building [\d.,]+ ha", table["data"]
        )
        assert "| corrupt | failed |" in table["data"]
        assert "landsat: compute (4 cores to compute, 0 resumed, 0 nodata)" in run["logs"], "engine progress"
        assert "kampala: 1/1 cores" in " ".join(run["logs"])
        for scene in ("kampala", "landsat"):
            assert artifacts[f"quicklook-{scene}"]["data"].startswith("data:image/png;base64,")
        published = _digests(out)
        staged = _mtimes(out / ".work")

        # 2: nothing changed: both skipped, no byte rewritten, nothing staged or computed
        second = _run_flow(env, incoming, tiny_buildings_model, out, work)
        outcomes = _last_run(out)
        assert outcomes["kampala"]["outcome"] == outcomes["landsat"]["outcome"] == "skipped"
        assert _digests(out) == published
        assert _mtimes(out / ".work") == staged

        # 3: one input changed: only it is redone
        with rasterio.open(chip, "r+") as dataset:
            pixels = dataset.read()
            dataset.write(255 - pixels)
        third = _run_flow(env, incoming, tiny_buildings_model, out, work)
        runs = _readback(env, second, third)["runs"]
        # the corrupt file is still there: both flow runs failed for it
        assert runs[second]["state"] == runs[third]["state"] == "FAILED"
        outcomes = _last_run(out)
        assert outcomes["kampala"]["outcome"] == "done"
        assert outcomes["kampala"]["tiles"]["computed"] == 1
        assert outcomes["landsat"]["outcome"] == "skipped"
        now = _digests(out)
        assert {k: v for k, v in now.items() if k.startswith("landsat")} == {
            k: v for k, v in published.items() if k.startswith("landsat")
        }
        assert now["kampala/report.json"] != published["kampala/report.json"]
        report = json.loads((out / "kampala" / "report.json").read_text())
        assert report["input_identity"] == "sha256:" + hashlib.sha256(chip.read_bytes()).hexdigest()

        # 4: the same flow from a bucket prefix into a bucket (moto's S3 server); its re-run skipping by the
        # bucket's manifest is tested without Prefect (tests/test_object_store.py)
        s3.upload(s3.bucket, "incoming/kampala.tif", chip)
        bucket_run = [sys.executable, "-m", "flows.cli", "run-flow", f"s3://{s3.bucket}/incoming/"]
        bucket_run += ["--model", str(tiny_buildings_model), "--out", f"s3://{s3.bucket}/masks"]
        bucket_run += ["--work-dir", str(work), "--engine", "local", "--scratch", str(tmp_path / "scratch")]
        done = subprocess.run(
            bucket_run, env=env | s3.environment, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        said = done.stdout + done.stderr
        assert done.returncode == 0 and "kampala: done" in said, said[-3000:]
        from pipeline.io import objects

        manifest = json.loads(objects.get_bytes(f"s3://{s3.bucket}/masks/manifest.json"))
        assert manifest["runs"][-1]["flow_run_id"] and manifest["scenes"]
        _check_mask(next((tmp_path / "scratch").glob("*/kampala/mask.tif")), chip)  # the scratch copy
    finally:
        _stop(serve)
    assert serve.returncode == 0, log.read_text()[-4000:]
    assert not [pid for pid in started if _alive(pid)], "every process started is stopped"
    assert not ray_dirs(out), "the runs' Ray temp dirs, in the work folder or the system's, are removed"
