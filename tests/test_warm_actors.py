"""Actors left warm on a running cluster (`--keep-warm-s`): the next run takes them as they are, a run of
another shape makes room by stopping idle ones, and an idle warm actor ends itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ray.local_cluster import LocalRayCluster
from pipeline.ray.warm_actors import NAMESPACE

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--tile", "128", "--halo", "32"]

_LIST_WARM = f"""
import json, ray
from ray.util import list_named_actors
ray.init(address="auto", log_to_driver=False, configure_logging=False)
names = [a["name"] for a in list_named_actors(all_namespaces=True) if a["namespace"] == {NAMESPACE!r}]
print(json.dumps(sorted(names)))
"""


@pytest.fixture
def cluster(ray_cluster: LocalRayCluster) -> LocalRayCluster:
    """The session's cluster: two worker nodes of one CPU each. A warm model actor without the CRF holds
    its node's CPU, so a run with the CRF (a model and a CRF actor of half a CPU each) must evict it."""
    return ray_cluster


def _segment(cluster: LocalRayCluster, scene: Path, model: Path, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "pipeline.cli", "segment", str(scene), "--model", str(model)]
    command += ["--out", str(out), "--ray-address", cluster.address, *OPTIONS, *extra]
    done = subprocess.run(command, env=cluster.client_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / scene.stem / "report.json").read_text())


def _warm_actors(cluster: LocalRayCluster) -> list[str]:
    env = cluster.client_env() | {"RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-c", _LIST_WARM], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_a_second_run_takes_the_warm_model_actor_and_another_shape_evicts_it(
    cluster: LocalRayCluster, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    nodes = len(cluster.workers)  # a model actor on each worker node
    first = _segment(
        cluster, landsat, tiny_landcover_model, tmp_path / "a", "--no-crf", "--keep-warm-s", "120"
    )
    assert first["cluster"]["actors_started"] == {"model": nodes}
    assert first["cluster"]["actors_reused"] == {}
    warm = _warm_actors(cluster)
    assert len(warm) == nodes and all(name.startswith("deeplab-model-") for name in warm), warm

    second = _segment(
        cluster, landsat, tiny_landcover_model, tmp_path / "b", "--no-crf", "--keep-warm-s", "120"
    )
    assert second["cluster"]["actors_started"] == {}, "the model was not loaded again"
    assert second["cluster"]["actors_reused"] == {"model": nodes}
    assert _warm_actors(cluster) == warm
    masks = [(tmp_path / run / landsat.stem / "mask.tif").read_bytes() for run in ("a", "b")]
    assert masks[0] == masks[1], "a warm actor computes what a new one does"

    # The CRF plan (a model and a CRF actor of half the node each) cannot be placed beside the warm actor,
    # which holds the node's CPU: the run stops it (idle) instead of waiting for its idle limit.
    started = time.monotonic()
    third = _segment(cluster, landsat, tiny_landcover_model, tmp_path / "c")
    assert time.monotonic() - started < 110, "the run did not wait for the warm actor's idle limit"
    assert third["cluster"]["actors_started"] == {"crf": nodes, "model": nodes}
    assert third["cluster"]["actors_reused"] == {}
    assert _warm_actors(cluster) == [], "evicted; and a run without --keep-warm-s leaves nothing up"


@pytest.mark.slow
def test_an_idle_warm_actor_ends_itself(
    cluster: LocalRayCluster, landsat: Path, tiny_landcover_model: Path, tmp_path: Path
) -> None:
    report = _segment(
        cluster, landsat, tiny_landcover_model, tmp_path / "a", "--no-crf", "--keep-warm-s", "3"
    )
    assert report["cluster"]["actors_started"] == {"model": len(cluster.workers)}
    deadline = time.monotonic() + 60
    while (left := _warm_actors(cluster)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == [], "the warm actor stopped after 3 s without work"


def test_a_warm_actor_is_idle_only_between_calls_of_work() -> None:
    from pipeline.ray.warm_actors import Warmable, working

    class Probe(Warmable):
        @working
        def work(self, seconds: float) -> float:
            return self.idle_seconds()

    probe = Probe()
    assert probe.idle_seconds() == float("inf"), "never used: idle"
    assert probe.work(0.0) == 0.0, "busy while a call of work runs"
    assert 0.0 <= probe.idle_seconds() < 1.0, "idle from the end of the last call"


def test_warm_actor_names_carry_their_shape_and_node() -> None:
    from pipeline.ray.warm_actors import _key_and_node, actor_name, shape_key

    node = "f" * 56
    key = shape_key("0" * 64, "model", {"plan": {"model_cpus": 2.0}, "device": "auto", "amp": True})
    assert key != shape_key("0" * 64, "model", {"plan": {"model_cpus": 0.5}, "device": "auto", "amp": True})
    assert key != shape_key("1" * 64, "model", {"plan": {"model_cpus": 2.0}, "device": "auto", "amp": True})
    assert _key_and_node(actor_name("crf", key, node, 3)) == (key, node[:16])
    assert _key_and_node("someone-elses-actor") == ("", "")
