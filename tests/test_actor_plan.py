"""Actor shapes per node (no Ray needed) and what a node checks of the shared storage."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from pipeline.ray.actor_pools import ActorPlan, PoolStats
from pipeline.ray.storage import sees


def test_gpu_node_runs_model_actors_per_gpu_share_and_crf_on_spare_cpus() -> None:
    plan = ActorPlan.for_resources(cpus=4, gpus=1, crf=True, cluster_has_gpus=True, gpus_per_model_actor=0.5)
    assert (plan.model_actors, plan.model_gpus) == (2, 0.5)
    assert plan.crf_actors == 3 and plan.crf_cpus == 1.0
    whole = ActorPlan.for_resources(cpus=8, gpus=2, crf=False, cluster_has_gpus=True)
    assert (whole.model_actors, whole.model_gpus, whole.crf_actors) == (2, 1.0, 0)


def test_cpu_node_of_a_gpu_cluster_only_refines() -> None:
    plan = ActorPlan.for_resources(cpus=16, gpus=0, crf=True, cluster_has_gpus=True)
    assert (plan.model_actors, plan.crf_actors) == (0, 16)
    assert ActorPlan.for_resources(cpus=16, gpus=0, crf=False, cluster_has_gpus=True).model_actors == 0


@pytest.mark.parametrize(
    ("cpus", "crf", "expected"),
    [
        (0, True, (0, 0)),  # a head started with --num-cpus 0 runs drivers only
        (1, True, (1, 1)),
        (2, True, (1, 1)),
        (8, True, (1, 7)),
        (8, False, (1, 0)),
    ],
)
def test_cpu_cluster_node_shapes(cpus: float, crf: bool, expected: tuple[int, int]) -> None:
    plan = ActorPlan.for_resources(cpus=cpus, gpus=0, crf=crf)
    assert (plan.model_actors, plan.crf_actors) == expected
    requested = plan.model_actors * plan.model_cpus + plan.crf_actors * plan.crf_cpus
    assert requested <= max(cpus, 0), "the node's actors fit its CPUs"


def test_model_actors_borrow_the_idle_crf_cpus_for_the_context_pass() -> None:
    beside_crf = ActorPlan.for_resources(cpus=2, gpus=0, crf=True)
    assert beside_crf.model_threads == 1 and beside_crf.threads_without_crf(2) == 2
    assert ActorPlan.for_resources(cpus=8, gpus=0, crf=True).threads_without_crf(8) == 8
    gpu = ActorPlan.for_resources(cpus=8, gpus=1, crf=True, cluster_has_gpus=True)
    assert gpu.threads_without_crf(8) == gpu.model_threads == 1


def test_pool_stats_by_node() -> None:
    stats = PoolStats(cores=Counter({("10.0.0.1 aa", "model"): 3, ("10.0.0.1 aa", "crf"): 2}))
    assert stats.by_node() == {"10.0.0.1 aa": {"crf_cores": 2, "model_cores": 3}}


def test_a_node_reports_what_it_cannot_see(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("token")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert sees(str(probe), "token", b"weights", digest) == []
    assert sees(None, "token", b"weights", digest) == []  # a bucket --out: no folder to see
    problems = sees(str(probe), "another", b"weights", "0" * 64)
    assert "holds another probe" in problems[0] and "arrived changed" in problems[1]
    problems = sees(str(tmp_path / "missing" / "probe"), "token", b"weights", digest)
    assert problems == [f"cannot read {tmp_path / 'missing'}: No such file or directory"]


def test_a_shipped_checkpoint_is_kept_once_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deeplab_common.errors import CheckpointError
    from models.checkpoint import checkpoint_on_this_node

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    digest = hashlib.sha256(b"weights").hexdigest()
    path = checkpoint_on_this_node(b"weights", digest)
    assert path.read_bytes() == b"weights" and path.is_relative_to(tmp_path) and digest in path.name
    stamp = path.stat().st_mtime_ns
    assert checkpoint_on_this_node(b"weights", digest) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="arrived changed"):
        checkpoint_on_this_node(b"weight5", digest)
