"""The run's Ray session: start a local cluster (temp dir under the work dir, dashboard and usage stats off)
or join one; the actors a run keeps for all its scenes; what a run saw on the cluster, for the report."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import DeepLabError
from pipeline.engine.workers import (
    WorkSpec,
)
from pipeline.ray.actor_pools import ActorPools, PoolStats

# Ray puts session_<date>_<pid>/sockets/plasma_store (~61 bytes) under its temp dir; AF_UNIX allows 107.


_MAX_SOCKET_PATH = 40


# How often the pools look for nodes that joined or died, and the longest a wait for results blocks.
@dataclass
class RunStats:
    """What a run on the cluster saw, for the report: where cores ran, what was lost, actors' memory."""

    pools: PoolStats = field(default_factory=PoolStats)
    actor_memory: dict[str, list[float]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "nodes": self.pools.by_node(),
            "nodes_lost": self.pools.nodes_lost,
            "actors_started": dict(sorted(self.pools.actors_started.items())),
            "actors_reused": dict(sorted(self.pools.actors_reused.items())),
            "actors_lost": self.pools.actors_lost,
            "cores_retried": self.pools.cores_retried,
        }


def ray_temp_dir(work_dir: Path) -> str:
    """Under the work dir when the path is short enough for Ray's sockets, else a stable /tmp path."""
    preferred = (Path(work_dir) / "ray").resolve()
    if len(str(preferred)) <= _MAX_SOCKET_PATH:
        preferred.mkdir(parents=True, exist_ok=True)
        return str(preferred)
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:10]
    fallback = Path(tempfile.gettempdir()) / f"deeplab-ray-{digest}"
    fallback.mkdir(parents=True, exist_ok=True)
    return str(fallback)


@contextmanager
def ray_session(
    work_dir: Path,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Join a cluster or start a local one; a local one is shut down again on exit.

    ``worker_env`` is set in every worker and actor of this job (a cluster's workers do not inherit the
    driver's environment).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield ray
        return
    temp_dir = None
    runtime_env = {"env_vars": dict(worker_env)} if worker_env else None
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
        except ray.exceptions.AuthenticationError as exc:
            raise DeepLabError(
                f"the Ray cluster at {address} refused this client: {str(exc).splitlines()[0]} "
                "It runs with token authentication: set RAY_AUTH_MODE=token and the cluster's token in "
                "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)"
            ) from exc
    else:
        temp_dir = ray_temp_dir(work_dir)
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=temp_dir,
            runtime_env=runtime_env,
        )
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp_dir is not None and not temp_dir.startswith(str(Path(work_dir).resolve())):
            shutil.rmtree(temp_dir, ignore_errors=True)  # the /tmp fallback is ours alone: leave nothing


class KeptActors:
    """Actor pools kept for a Ray session: the scenes of a batch share the actors, and with them each
    actor's start and model load (seconds per actor on a CPU, more with a GPU's context)."""

    def __init__(self, ray: Any, keep_warm_s: float = 0.0) -> None:
        self.ray = ray
        self.keep_warm_s = keep_warm_s
        self.kept: dict[tuple[str, bool, str, bool, float], ActorPools] = {}
        # pools started ahead of their scene (``start``): the scene that first uses them counts their actors
        self.unclaimed: set[tuple[str, bool, str, bool, float]] = set()

    def start(
        self, checkpoint: Path, checkpoint_sha256: str, spec: WorkSpec, gpus_per_model_actor: float
    ) -> None:
        """Create a scene's actors now, before it is staged: Ray starts them in the background, so their
        start, model load and preparation overlap the staging instead of delaying the first window."""
        key = self._key(checkpoint_sha256, spec, gpus_per_model_actor)
        if key in self.kept:
            return
        pools = self.kept[key] = self._pools(
            checkpoint, checkpoint_sha256, spec, gpus_per_model_actor, PoolStats()
        )
        pools.refresh()
        self.unclaimed.add(key)

    @staticmethod
    def _key(
        checkpoint_sha256: str, spec: WorkSpec, gpus_per_model_actor: float
    ) -> tuple[str, bool, str, bool, float]:
        return (checkpoint_sha256, spec.crf is not None, spec.device, spec.amp, gpus_per_model_actor)

    def pools(
        self,
        checkpoint: Path,
        checkpoint_sha256: str,
        spec: WorkSpec,
        gpus_per_model_actor: float,
        stats: PoolStats,
    ) -> ActorPools:
        """The pools for this checkpoint and actor shape, started at first use; ``stats`` counts for the
        scene now computing."""
        key = self._key(checkpoint_sha256, spec, gpus_per_model_actor)
        pools = self.kept.get(key)
        if pools is None:
            pools = self.kept[key] = self._pools(
                checkpoint, checkpoint_sha256, spec, gpus_per_model_actor, stats
            )
        if key in self.unclaimed:
            self.unclaimed.discard(key)
            stats.actors_started.update(pools.stats.actors_started)
            stats.actors_reused.update(pools.stats.actors_reused)
        pools.stats = stats
        return pools

    def _pools(
        self, checkpoint: Path, sha256: str, spec: WorkSpec, gpus_per_model_actor: float, stats: PoolStats
    ) -> ActorPools:
        return ActorPools(
            self.ray,
            str(checkpoint),
            spec,
            gpus_per_model_actor,
            stats,
            keep_warm_s=self.keep_warm_s,
            checkpoint_sha256=sha256,
        )

    def discard_unless_idle(self, pools: ActorPools) -> None:
        """After a scene: pools whose actors still hold work (the scene failed while windows were in flight)
        are stopped, so the next scene starts on clean actors instead of queueing behind stale work."""
        if any(member.load for member in pools.members):
            pools.close(leave_warm=False)
            self.kept = {key: kept for key, kept in self.kept.items() if kept is not pools}
            self.unclaimed &= set(self.kept)

    def close(self) -> None:
        for pools in self.kept.values():
            pools.close()
        self.kept.clear()
        self.unclaimed.clear()


@contextmanager
def kept_actors(ray: Any, keep_warm_s: float = 0.0) -> Iterator[KeptActors]:
    actors = KeptActors(ray, keep_warm_s)
    try:
        yield actors
    finally:
        actors.close()


@contextmanager
def actor_pools(
    ray: Any,
    checkpoint: Path,
    spec: WorkSpec,
    gpus_per_model_actor: float,
    stats: PoolStats | None = None,
    keep_warm_s: float = 0.0,
    checkpoint_sha256: str | None = None,
) -> Iterator[ActorPools]:
    """Model and CRF actors for one scene's passes (started as the cluster allows), stopped at the end
    (left warm for ``keep_warm_s`` instead when it is > 0)."""
    pools = ActorPools(
        ray,
        str(checkpoint),
        spec,
        gpus_per_model_actor,
        stats,
        keep_warm_s=keep_warm_s,
        checkpoint_sha256=checkpoint_sha256,
    )
    try:
        yield pools
    finally:
        pools.close()
