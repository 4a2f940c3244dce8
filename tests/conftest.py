"""Shared fixtures: the real data in ../shared/data and the committed reference models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.tiny_like import tiny_like

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
ZOO = ROOT / "models" / "zoo"

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def shared_onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of ONNX exports for the whole session, as a user shares one between output folders
    (``DEEPLAB_ONNX_CACHE``): each checkpoint is exported once, not once per test's output folder. The
    default place, beside the work folder, is tested on its own (tests/test_runtime.py)."""
    from models.runtime import CACHE_ENV

    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real data not available: {path} is absent (expected ../shared/data beside the checkout, or "
            "DEEPLAB_DATA; `deeplab fetch-demo DIR` fetches the demo's Kampala chips and scene and the CMU-1 "
            "slide from their public origins into DIR: then run with DEEPLAB_DATA=DIR)"
        )
    return path


CLUSTER_FIXTURES = {"ray_cluster", "ray_cluster_session"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the session's Ray cluster run last, one after another, in their order: the cluster starts
    for the first of them and is stopped at the end of the session, so no other test runs beside it (the
    cluster launcher's `ray down` stops every Ray process of the machine, and refuses to while another runs;
    the exposure test looks at what the engine's own cluster listens on)."""
    on_cluster = [item for item in items if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ()))]
    items[:] = [item for item in items if item not in on_cluster] + on_cluster


@pytest.fixture(scope="session")
def ray_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The one multi-node Ray cluster of the session (tests take it through ``ray_cluster``): a head
    without CPUs and two worker nodes of one CPU each, every node a `ray start` of its own on loopback with
    token authentication. Started once; stopped at the end, by PID, with nothing of it left running."""
    from pipeline.ray.local_cluster import LocalRayCluster, processes_mentioning

    root = Path(tmp_path_factory.mktemp("rc", numbered=True))  # short: Ray's socket paths fit 107 bytes
    running = LocalRayCluster(root, workers=[{"cpus": 1}, {"cpus": 1}]).start()
    try:
        yield running
    finally:
        running.stop(grace=5.0)  # what a node's processes did not finish by then is killed: a test's cluster
    assert running.pids() == [], "every process of every node is stopped"
    assert not processes_mentioning(str(root)), "nothing of the cluster is left running"


@pytest.fixture
def ray_cluster(ray_cluster_session: Any) -> Any:
    """The session's cluster with both worker nodes live (a test before may have killed one)."""
    ray_cluster_session.restore()
    return ray_cluster_session


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def kampala(data_dir: Path) -> Path:
    return _require(data_dir / "kampala-buildings")


@pytest.fixture(scope="session")
def dubai(data_dir: Path) -> Path:
    return _require(data_dir / "dubai-landcover")


@pytest.fixture(scope="session")
def landsat(data_dir: Path) -> Path:
    return _require(data_dir / "landsat" / "RGB.byte.tif")


@pytest.fixture(scope="session")
def buildings_model() -> Path:
    """The compact building model (v3+ on Lite0): what the engine's tests run, a third faster than the
    reference model on this CPU."""
    path = ZOO / "buildings-kampala-lite0.safetensors"
    assert path.exists(), f"the compact model {path} must be committed"
    return path


@pytest.fixture(scope="session")
def reference_buildings_model() -> Path:
    path = ZOO / "buildings-kampala.safetensors"
    assert path.exists(), f"the reference model {path} must be committed"
    return path


@pytest.fixture(scope="session")
def landcover_model() -> Path:
    path = ZOO / "landcover-dubai-lite0.safetensors"
    assert path.exists(), f"the reference model {path} must be committed"
    return path


@pytest.fixture(scope="session")
def buildings_v2_model() -> Path:
    path = ZOO / "buildings-kampala-v2.safetensors"
    assert path.exists(), f"the reference model {path} must be committed"
    return path


@pytest.fixture(scope="session")
def tiny_buildings_model(tmp_path_factory: pytest.TempPathFactory, buildings_model: Path) -> Path:
    """The tiny test model with the Kampala building models' metadata (RGB, 7.5 cm, background/building)."""
    return tiny_like(buildings_model, tmp_path_factory.mktemp("tiny") / "tiny-buildings.safetensors")


@pytest.fixture(scope="session")
def tiny_landcover_model(tmp_path_factory: pytest.TempPathFactory, landcover_model: Path) -> Path:
    """The tiny test model with the Dubai land-cover model's metadata (6 classes, its tuned CRF), the CRF on:
    its held-out verdict is left out (the zoo model's says off), so the cluster tests run CRF actors."""
    from models.checkpoint import update_metadata

    path = tiny_like(landcover_model, tmp_path_factory.mktemp("tiny") / "tiny-landcover.safetensors")
    update_metadata(path, crf_verdict=None)
    return path


@pytest.fixture(scope="session")
def tiny_slide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model with the H&E slide model's metadata (its µm/px, classes and CRF verdict)."""
    return tiny_like(
        ZOO / "he-stain-cmu.safetensors", tmp_path_factory.mktemp("tiny") / "tiny-slide.safetensors"
    )


def kampala_chip(kampala: Path, stem: str = "OAM-1238456-1046532-21") -> tuple[Path, Path]:
    return kampala / "chips" / f"{stem}.tif", kampala / "masks" / f"{stem}.tif"


def copy_kampala_pairs(kampala: Path, target: Path, stems: tuple[str, ...]) -> tuple[Path, Path]:
    """Copy chips and masks into ``target/images`` and ``target/masks``; returns the two folders."""
    images, masks = target / "images", target / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in stems:
        shutil.copy(kampala / "chips" / f"{stem}.tif", images)
        shutil.copy(kampala / "masks" / f"{stem}.tif", masks)
    return images, masks


def kampala_card(model: Path, tmp_path: Path) -> str:
    """The model card ``deeplab card`` writes for ``model``, with the Kampala imagery's attribution."""
    from pipeline.cli import main

    attribution = tmp_path / "attribution.md"
    attribution.write_text("Imagery © OpenAerialMap contributors, CC BY 4.0.")
    card = tmp_path / "card.md"
    assert main(["card", str(model), "--attribution", str(attribution), "--out", str(card)]) == 0
    return card.read_text()


def load_model_and_chip(kampala: Path, model: Path, target: Path, stem: str) -> tuple[Any, np.ndarray]:
    """``model`` loaded (a ``LoadedModel``) and the real chip ``stem`` read as the evaluation reads it."""
    from models.checkpoint import load_checkpoint
    from pipeline.tools.evaluate import find_pairs

    images, masks = copy_kampala_pairs(kampala, target, (stem,))
    loaded = load_checkpoint(model)
    image, _ = find_pairs(str(images), str(masks), loaded)[0].whole()
    return loaded, image.numpy()


@pytest.fixture(scope="session")
def cmu_slide(data_dir: Path) -> Path:
    return _require(data_dir / "wsi" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def tcga_slide(data_dir: Path) -> Path:
    return _require(data_dir / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs")


def resume_after_kill(
    command_for: Callable[[Path], list[str]], scene_id: str, published: str, tmp_path: Path, cwd: Path
) -> tuple[Path, Path]:
    """An uninterrupted run, then a run that crashes (SIGKILL, no cleanup of any kind) once 5 cores are on
    record (``DEEPLAB_CRASH_AT``), then run again; returns both scene folders.

    Checks what every resume must hold: nothing half-published, the re-run resumes exactly the cores the
    crashed run recorded and computes the rest.
    """
    from deeplab_common.faults import CRASH_ENV

    reference, out = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command_for(reference), cwd=cwd, check=True, capture_output=True)
    total = json.loads((reference / scene_id / "report.json").read_text())["tiles"]["computed"]
    crashed = subprocess.run(
        command_for(out), cwd=cwd, capture_output=True, env=os.environ | {CRASH_ENV: "ledger-core:5"}
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert len((out / ".work" / scene_id / "ledger.jsonl").read_text().splitlines()) == 5 < total
    assert not (out / scene_id / published).exists(), "nothing half-published"
    subprocess.run(command_for(out), cwd=cwd, check=True, capture_output=True)
    report = json.loads((out / scene_id / "report.json").read_text())
    assert report["tiles"]["resumed"] == 5
    assert report["tiles"]["computed"] == total - 5
    return reference / scene_id, out / scene_id


@pytest.fixture(scope="session")
def s3_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One moto S3 server for the session (its own process, a free loopback port)."""
    from bench.s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3(s3_session: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """The S3 server, with this test's process environment pointed at it as a user would point theirs
    (``AWS_ENDPOINT_URL`` and keys), and a bucket of its own named after the test."""
    for name, value in s3_session.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3_session.create_bucket(bucket)
    s3_session.bucket = bucket
    return s3_session
