"""`deeplab train` on the local multi-node Ray cluster: two Ray Train workers (DDP over gloo), checkpoints in
the run's storage, and a killed run resumed from its last checkpoint by the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import read_metadata
from pipeline.ray.local_cluster import LocalRayCluster
from tests.conftest import copy_kampala_pairs

CHIPS = (
    "OAM-1238448-1046528-21",
    "OAM-1238449-1046529-21",
    "OAM-1238450-1046530-21",
    "OAM-1238451-1046531-21",
)


def _command(images: Path, masks: Path, out: Path, storage: Path, address: str) -> list[str]:
    deeplab = str(Path(sys.executable).with_name("deeplab"))
    return [
        deeplab, "train", "--images", str(images), "--masks", str(masks), "--classes", "background,building",
        "--arch", "deeplabv2_tiny", "--pretrained", "none", "--crop-size", "96", "--batch-size", "4",
        "--epochs", "4", "--seed", "5", "--fp32", "--workers", "2", "--ray-address", address,
        "--train-storage", str(storage), "--out", str(out),
    ]  # fmt: skip


def _latest_kept(storage: Path) -> Path | None:
    """The state of the run's latest checkpoint, once Ray Train has recorded it in its snapshot."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except ValueError:  # being rewritten
            return None
        if latest:
            return snapshot.parent / latest["checkpoint_dir_name"] / "state.pt"
    return None


def test_a_killed_training_run_on_the_cluster_resumes_from_its_last_checkpoint(
    ray_cluster: LocalRayCluster, kampala: Path, tmp_path: Path
) -> None:
    images, masks = copy_kampala_pairs(kampala, tmp_path, CHIPS)
    out, storage = tmp_path / "cluster.safetensors", tmp_path / "storage"
    command = _command(images, masks, out, storage, ray_cluster.address)
    env = ray_cluster.client_env()
    first = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while _latest_kept(storage) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read()[-2000:]!r}"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, as a lost head would
    first.wait()
    latest = _latest_kept(storage)
    assert latest is not None
    kept = torch.load(latest, map_location="cpu", weights_only=True)
    assert 1 <= kept["epoch"] < 4 and not out.exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metadata = read_metadata(out)
    assert metadata.training["epochs_completed"] == 4 and metadata.training["workers"] == 2
    history = metadata.metrics["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    # the epochs before the kill are those the killed run kept: resumed, not started over
    assert history[: kept["epoch"]] == kept["history"]
    assert "gloo on CPUs" in again.stderr
