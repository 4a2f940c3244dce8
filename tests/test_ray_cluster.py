"""A real multi-node Ray cluster on this machine (a head and two worker nodes, each its own raylet), jobs
submitted with `ray job submit --working-dir`, token authentication on: a node joining mid-run, a worker
node's raylet SIGKILLed mid-run, a driver SIGKILLed mid-run and the job submitted again."""

from __future__ import annotations

import json
import os
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

from pipeline.ray.local_cluster import LocalRayCluster, processes_mentioning
from tests.pools_probe import MARK

ROOT = Path(__file__).resolve().parents[1]
SCENE_ID = "RGB.byte"
OPTIONS = ["--tile", "128", "--halo", "32"]


@pytest.fixture
def cluster(ray_cluster: LocalRayCluster) -> LocalRayCluster:
    return ray_cluster


def _submit(cluster: LocalRayCluster, scene: Path, model: Path, out: Path) -> list[str]:
    """`ray job submit --working-dir <checkout> -- deeplab segment ...` against the cluster's dashboard."""
    ray = str(Path(sys.executable).parent / "ray")
    job = [ray, "job", "submit", f"--address={cluster.dashboard_url}", f"--working-dir={ROOT}", "--"]
    return [*job, "deeplab", "segment", str(scene), "--model", str(model), "--out", str(out), *OPTIONS]


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _recorded(out: Path) -> int:
    ledger = out / ".work" / SCENE_ID / "ledger.jsonl"
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0


def _wait_for_cores(job: subprocess.Popen[bytes], out: Path, count: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while _recorded(out) < count and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return _recorded(out)


def _report(out: Path) -> dict:
    return json.loads((out / SCENE_ID / "report.json").read_text())


def _driver_pids(out: Path) -> list[int]:
    """The job's driver: the `deeplab segment` process writing into ``out`` (not the shell around it)."""
    drivers = []
    for pid in processes_mentioning(str(out)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith("/deeplab") and argv[2] == "segment":
            drivers.append(pid)
    return drivers


@pytest.mark.slow
def test_token_authentication_refuses_a_client_without_the_token(
    cluster: LocalRayCluster, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    env = cluster.client_env()
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    run = subprocess.run(
        [
            "deeplab",
            "segment",
            str(landsat),
            "--model",
            str(tiny_landcover_model),
            "--out",
            str(tmp_path),
            "--ray-address",
            cluster.address,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "refused this client" in run.stdout + run.stderr
    assert "RAY_AUTH_TOKEN" in run.stdout + run.stderr


@pytest.mark.slow
def test_a_node_that_sees_none_of_the_drivers_files_computes_a_bucket_job(
    cluster: LocalRayCluster, s3: Any, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    """A worker node started without the driver's folder (its own mount namespace, an empty tmpfs over it),
    which holds the checkpoint and the scratch folder; the scene and ``--out`` are in a bucket. The checkpoint
    is shipped, the windows too, and the blind node computes its share; the mask is the local run's, pixel
    for pixel. (With a local ``--out`` such a node is named by the storage check and nothing is computed:
    ``tests/test_actor_plan.py`` checks what a node reports.)"""
    from pipeline.engine.driver import run_batch
    from pipeline.engine.options import SegmentOptions
    from pipeline.io import objects

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here (needs CAP_SYS_ADMIN)")
    private = tmp_path / "driver-only"
    private.mkdir()
    model = private / "model.safetensors"
    shutil.copy(tiny_landcover_model, model)
    url = s3.upload(s3.bucket, "in/RGB.byte.tif", landsat)
    out = f"s3://{s3.bucket}/out"
    cluster.add_worker("blind", {"cpus": 1, "hide": [str(private)]})
    try:
        cluster.wait_for_nodes(4)
        command = ["deeplab", "segment", url, "--model", str(model), "--out", out]
        command += ["--scratch", str(private / "scratch"), "--ray-address", cluster.address, *OPTIONS]
        run = subprocess.run(command, env=cluster.client_env(), capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop_node("blind")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(objects.get_bytes(f"{out}/{SCENE_ID}/report.json"))
    nodes = report["cluster"]["nodes"]
    assert len([n for n in nodes.values() if n.get("model_cores", 0) > 0]) == 3, f"all three workers: {nodes}"
    local = tmp_path / "local"
    run_batch(landsat, tiny_landcover_model, local, SegmentOptions(engine="local", tile=128, halo=32))
    far = tmp_path / "far.tif"
    far.write_bytes(objects.get_bytes(f"{out}/{SCENE_ID}/mask.tif"))
    with rasterio.open(far) as ours, rasterio.open(local / SCENE_ID / "mask.tif") as theirs:
        assert np.array_equal(ours.read(), theirs.read())


@pytest.mark.slow
def test_actor_pools_follow_nodes_that_join_and_leave(
    cluster: LocalRayCluster, tiny_landcover_model: Path
) -> None:
    """What an autoscaler does to a running job: a node added gets actors, a node removed loses them."""
    probe = subprocess.Popen(
        [sys.executable, "-m", "tests.pools_probe", cluster.address, str(tiny_landcover_model)],
        cwd=ROOT,
        env=cluster.client_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdin is not None and probe.stdout is not None

    def refresh(until_nodes: int | None = None) -> dict:
        """Refresh until the actors live on ``until_nodes`` nodes (a joining node's resources and a
        stopped node's death reach the node table within seconds), at most 60 s."""
        deadline = time.monotonic() + 60
        while True:
            probe.stdin.write("refresh\n")
            probe.stdin.flush()
            line = probe.stdout.readline()
            while line and not line.startswith(MARK):  # a line of Ray's own, such as a lost node's
                line = probe.stdout.readline()
            seen = json.loads(line.removeprefix(MARK))
            if until_nodes in (None, len(seen["nodes"])) or time.monotonic() > deadline:
                return seen
            time.sleep(2)

    try:
        first = refresh()
        assert len(first["nodes"]) == 2, "actors on both worker nodes, none on the CPU-less head"
        cluster.add_worker("worker3", {"cpus": 1})
        cluster.wait_for_nodes(4)
        second = refresh(until_nodes=3)
        assert len(second["nodes"]) == 3 and set(first["nodes"]) < set(second["nodes"])
        cluster.stop_node("worker3")
        cluster.wait_for_nodes(3)
        third = refresh(until_nodes=2)
        assert third["nodes"] == first["nodes"] and len(third["lost"]) == 1
    finally:
        probe.stdin.close()
        probe.wait(timeout=120)
    assert probe.returncode == 0


@pytest.fixture(scope="module")
def clean_run(
    ray_cluster_session: LocalRayCluster,
    landsat: Path,
    tiny_landcover_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The job run once without harm: the output folder every harmed run is compared with."""
    cluster = ray_cluster_session
    cluster.restore()
    clean = tmp_path_factory.mktemp("clean")
    run = subprocess.run(
        _submit(cluster, landsat, tiny_landcover_model, clean),
        env=cluster.client_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return clean


@pytest.mark.slow
def test_multi_node_job_survives_a_lost_node_and_a_lost_driver(
    cluster: LocalRayCluster, clean_run: Path, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    env = cluster.client_env()
    clean = clean_run
    report = _report(clean)
    nodes = report["cluster"]["nodes"]
    workers_used = [label for label, done in nodes.items() if done.get("model_cores", 0) > 0]
    assert len(workers_used) == 2, f"cores computed on both worker nodes: {nodes}"
    assert all(done.get("crf_cores", 0) > 0 for done in nodes.values())
    assert report["tiles"]["computed"] == sum(d["model_cores"] for d in nodes.values())
    total = report["tiles"]["computed"]

    # a worker node lost mid-run: its raylet SIGKILLed (its actors go with it)
    lost_node = tmp_path / "lost-node"
    job = _start(_submit(cluster, landsat, tiny_landcover_model, lost_node), env)
    at_kill = _wait_for_cores(job, lost_node, 8)
    assert at_kill < total, "killed mid-run"
    cluster.kill_raylet("worker1")
    output = job.communicate(timeout=600)[0].decode(errors="replace")
    assert job.returncode == 0, output[-4000:]
    report = _report(lost_node)
    # the node's actors were lost and their cores computed again on the other node
    assert report["cluster"]["actors_lost"] >= 1, report["cluster"]
    assert report["cluster"]["cores_retried"] >= 1, report["cluster"]
    assert report["tiles"]["computed"] == total
    assert (lost_node / SCENE_ID / "mask.tif").read_bytes() == (clean / SCENE_ID / "mask.tif").read_bytes()

    # the driver lost mid-run (SIGKILL), the job submitted again: it resumes from the ledger
    lost_driver = tmp_path / "lost-driver"
    job = _start(_submit(cluster, landsat, tiny_landcover_model, lost_driver), env)
    done_before = _wait_for_cores(job, lost_driver, 6)
    drivers = _driver_pids(lost_driver)
    assert drivers, "the job's driver is running"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    job.communicate(timeout=300)
    assert job.returncode != 0, "the job failed with its driver"
    assert not (lost_driver / SCENE_ID / "mask.tif").exists()
    run = subprocess.run(
        _submit(cluster, landsat, tiny_landcover_model, lost_driver), env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = _report(lost_driver)
    assert report["tiles"]["resumed"] >= done_before > 0
    assert report["tiles"]["computed"] == total - report["tiles"]["resumed"]
    assert (lost_driver / SCENE_ID / "mask.tif").read_bytes() == (clean / SCENE_ID / "mask.tif").read_bytes()


def _actor_pids(cluster: LocalRayCluster, kind: str) -> list[int]:
    """Live actor processes of one class on the cluster's nodes: Ray names them ``ray::<Class>`` or
    ``ray::<Class>.<method>``, and starts them as children of a node's raylet (in a session of their own)."""
    nodes = set(cluster.pids())
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        try:
            if title.startswith(f"ray::{kind}") and any(p.pid in nodes for p in process.parents()):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_model_actor_and_a_crf_actor_killed_mid_run_change_nothing(
    cluster: LocalRayCluster, clean_run: Path, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    env = cluster.client_env()
    clean = clean_run
    total = _report(clean)["tiles"]["computed"]
    deadline = time.monotonic() + 60  # the clean job's actors gone: any actor from now on is the next job's
    while (
        _actor_pids(cluster, "ModelActor") or _actor_pids(cluster, "CRFActor")
    ) and time.monotonic() < deadline:
        time.sleep(0.5)

    killed = tmp_path / "killed-actors"
    job = _start(_submit(cluster, landsat, tiny_landcover_model, killed), env)
    assert _wait_for_cores(job, killed, 4) < total, "killed mid-run"
    victims = [_actor_pids(cluster, "ModelActor")[:1], _actor_pids(cluster, "CRFActor")[:1]]
    assert all(victims), f"a model actor and a CRF actor are running: {victims}"
    for (pid,) in victims:
        os.kill(pid, signal.SIGKILL)
    output = job.communicate(timeout=600)[0].decode(errors="replace")
    assert job.returncode == 0, output[-4000:]
    assert not any(psutil.pid_exists(pid) for (pid,) in victims)
    # Ray restarts a killed actor and retries its task (max_restarts, max_task_retries): the engine sees
    # the windows arrive, every core is computed once, and the mask is the clean run's
    report = _report(killed)
    assert report["tiles"]["computed"] == total, report["tiles"]
    assert (killed / SCENE_ID / "mask.tif").read_bytes() == (clean / SCENE_ID / "mask.tif").read_bytes()
