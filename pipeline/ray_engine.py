"""The Ray engine: model actors (GPU when there is one) feed dense-CRF actors; cores stream to the ledger.

The driver reads core+halo windows from the staged zarr store and keeps at most ``max_in_flight`` tasks
outstanding (explicit backpressure), so memory stays bounded whatever the scene size. Ray starts locally by
itself (temp dir under the work dir, dashboard and usage stats off) or joins ``address`` / ``RAY_ADDRESS``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DeepLabError
from pipeline.actor_pools import ActorPools, Member, NodeInfo, PoolStats, lost_work_errors
from pipeline.grid import Tile, core_of
from pipeline.ledger import Ledger
from pipeline.workers import (
    CoreDone,
    Work,
    WorkSpec,
    cores_in,
    crf_inputs,
    read_windows,
    tiles_of,
    window_batches,
    write_core,
)

# Ray puts session_<date>_<pid>/sockets/plasma_store (~61 bytes) under its temp dir; AF_UNIX allows 107.
_MAX_SOCKET_PATH = 40
# How often the pools look for nodes that joined or died, and the longest a wait for results blocks.
_REFRESH_S = 2.0


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
    address: str | None = None,
    num_cpus: int | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Join a cluster or start a local one; a local one is shut down again on exit.

    ``worker_env`` is set in every worker and actor of this job (a cluster's workers do not inherit the
    driver's environment).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
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


@dataclass
class _ModelJob:
    member: Member
    batch: int  # index into the batch list: a lost batch is resubmitted whole, so batches never change
    windows: list[np.ndarray]
    cores: int  # the cores those windows yield: what the actor's load and the in-flight bound count


@dataclass
class _CRFJob:
    tile: Tile
    valid: np.ndarray | None
    probabilities: np.ndarray
    window: np.ndarray
    near: NodeInfo  # the model's node: a CRF actor there needs no transfer
    member: Member | None = None


class _Upkeep:
    """What both passes do around their work: look at the cluster every few seconds (nodes join, die), run a
    one-time check before the first work is sent, and give up when no node can take work for too long."""

    def __init__(self, pools: ActorPools, node_wait_s: float, before_work: Callable[[], None] | None) -> None:
        self.pools = pools
        self.node_wait_s = node_wait_s
        self.before_work = before_work
        self.last_refresh = -1e9
        self.starved_since: float | None = None

    def tick(self) -> None:
        if time.monotonic() - self.last_refresh > _REFRESH_S:
            self.pools.refresh()
            self.last_refresh = time.monotonic()
        if self.before_work is not None:
            check, self.before_work = self.before_work, None
            check()

    def look_now(self) -> None:
        """An actor was lost: find out at the next tick whether its node is gone."""
        self.last_refresh = -1e9

    def starving(self, why: Callable[[], str]) -> None:
        """Nothing runs: no actor can take the work until a node joins; wait, or fail after node_wait_s."""
        self.starved_since = self.starved_since or time.monotonic()
        if time.monotonic() - self.starved_since > self.node_wait_s:
            raise DeepLabError(why())
        time.sleep(_REFRESH_S)
        self.look_now()

    def working(self) -> None:
        self.starved_since = None


def run_tiles(
    ray: Any,
    image: Any,
    todo: list[Work],
    ledger: Ledger,
    checkpoint: Path,
    spec: WorkSpec,
    max_in_flight: int | None = None,
    on_core: CoreDone | None = None,
    stats: RunStats | None = None,
    gpus_per_model: float = 1.0,
    node_wait_s: float = 120.0,
    before_work: Callable[[], None] | None = None,
    pools: ActorPools | None = None,
) -> int:
    """Compute every core in ``todo`` on actors across the cluster, each written to the ledger when done.

    Windows in flight are bounded (``max_in_flight``, else twice what the actors can hold). Work on an actor
    or node that is lost is resubmitted to the remaining ones; the cores written never depend on which node
    computed them. ``stats`` receives windows per node, losses and each actor's peak RSS. ``before_work`` runs
    once the first actors are being created, before any window is sent (a check that may refuse the run).
    ``pools``: actors the caller started (``actor_pools``), left running; else the run starts its own.
    """
    if not todo:
        return 0
    stats = stats if stats is not None else RunStats()
    if pools is None:
        with actor_pools(ray, checkpoint, spec, gpus_per_model, stats.pools) as own:
            return run_tiles(
                ray,
                image,
                todo,
                ledger,
                checkpoint,
                spec,
                max_in_flight,
                on_core,
                stats,
                node_wait_s=node_wait_s,
                before_work=before_work,
                pools=own,
            )
    lost = lost_work_errors(ray)
    batches = window_batches(todo, spec.batch_size)
    queue = deque(range(len(batches)))
    model_jobs: dict[Any, _ModelJob] = {}
    crf_waiting: deque[_CRFJob] = deque()
    crf_jobs: dict[Any, _CRFJob] = {}
    finished = 0
    upkeep = _Upkeep(pools, node_wait_s, before_work)

    def lose(member: Member, cores: int) -> None:
        """An actor (or its node) is gone: stop using it; its ``cores`` are queued again by the caller."""
        pools.drop(member)
        stats.pools.cores_retried += cores
        upkeep.look_now()

    def done(tile: Tile, valid: np.ndarray | None, planes: np.ndarray, node: str) -> None:
        nonlocal finished
        write_core(ledger, tile, valid, planes, node=node)
        finished += 1
        if on_core:
            on_core()

    def in_flight() -> int:
        return sum(j.cores for j in model_jobs.values()) + len(crf_jobs) + len(crf_waiting)

    while finished < len(todo):
        upkeep.tick()
        limit = max_in_flight or max(pools.capacity(spec.batch_size), spec.batch_size)
        while queue and in_flight() < limit and (member := pools.least_loaded("model")) is not None:
            index = queue.popleft()
            windows = read_windows(image, batches[index])
            ref = member.handle.predict_for.remote(windows, spec)
            cores = cores_in(batches[index])
            member.load += cores
            model_jobs[ref] = _ModelJob(member, index, windows, cores)
        while crf_waiting and (member := pools.least_loaded("crf", crf_waiting[0].near)) is not None:
            job = crf_waiting.popleft()
            job.member = member
            member.load += 1
            ref = member.handle.refine_core.remote(
                job.probabilities, job.window, spec.crf, spec.input_max, job.tile, spec.with_confidence
            )
            crf_jobs[ref] = job
        if not model_jobs and not crf_jobs:
            upkeep.starving(
                lambda: (
                    f"no live Ray node can run the {'CRF' if crf_waiting else 'model'} actors: "
                    f"{len(todo) - finished} cores left after waiting {node_wait_s:.0f} s for a node"
                )
            )
            continue
        upkeep.working()
        ready, _ = ray.wait([*model_jobs, *crf_jobs], num_returns=1, timeout=_REFRESH_S)
        for ref in ready:
            if ref in model_jobs:
                model_job = model_jobs.pop(ref)
                model_job.member.load -= model_job.cores
                try:
                    results = ray.get(ref)
                except lost:
                    lose(model_job.member, model_job.cores)
                    queue.appendleft(model_job.batch)
                    continue
                label = model_job.member.node.label
                stats.pools.cores[(label, "model")] += model_job.cores
                batch = batches[model_job.batch]
                for members, window, result in zip(batch, model_job.windows, results, strict=True):
                    for tile, valid in members:
                        if spec.crf is not None:
                            # cut here, not in the CRF actor: only the CRF's reach travels to it
                            crf_tile, probabilities, crf_window = crf_inputs(tile, result, window, spec.crf)
                            crf_waiting.append(
                                _CRFJob(crf_tile, valid, probabilities, crf_window, model_job.member.node)
                            )
                        else:
                            done(tile, valid, core_of(result, tile), label)
            else:
                crf_job = crf_jobs.pop(ref)
                assert crf_job.member is not None
                crf_job.member.load -= 1
                try:
                    planes = ray.get(ref)
                except lost:
                    lose(crf_job.member, 1)
                    crf_job.member = None
                    crf_waiting.appendleft(crf_job)
                    continue
                label = crf_job.member.node.label
                stats.pools.cores[(label, "crf")] += 1
                done(crf_job.tile, crf_job.valid, planes, label)
    stats.actor_memory = pools.peak_rss()
    pools.refresh(place=False)  # a node lost late is reported even when its work was redone already
    return len(todo)


def scene_context_sums(
    ray: Any,
    image: Any,
    todo: list[Work],
    pools: ActorPools,
    node_wait_s: float = 120.0,
    before_work: Callable[[], None] | None = None,
) -> np.ndarray:
    """Pass one of ``--context scene``: every core's pooled-feature sums, on the model actors of ``pools``
    (those of pass two: each loads its model once). The CRF actors wait meanwhile, so each model actor may
    use its node's CPUs (``ActorPools.context_threads``).

    A batch lost with its actor or node is sent again; the sums are added in batch order, so the result
    does not depend on which actor finished first."""
    lost = lost_work_errors(ray)
    batch_size = pools.spec.batch_size
    batches = window_batches(todo, batch_size)
    queue = deque(range(len(batches)))
    running: dict[Any, tuple[Member, int]] = {}
    sums: dict[int, np.ndarray] = {}
    upkeep = _Upkeep(pools, node_wait_s, before_work)
    while len(sums) < len(batches):
        upkeep.tick()
        limit = max(pools.capacity(batch_size), batch_size)
        while queue and len(running) * batch_size < limit and (m := pools.least_loaded("model")):
            index = queue.popleft()
            batch = batches[index]
            ref = m.handle.context_sums.remote(
                read_windows(image, batch), tiles_of(batch), pools.context_threads(m)
            )
            m.load += cores_in(batch)
            running[ref] = (m, index)
        if not running:
            upkeep.starving(lambda: f"no live Ray node can run the model actors (waited {node_wait_s:.0f} s)")
            continue
        upkeep.working()
        ready, _ = ray.wait(list(running), num_returns=1, timeout=_REFRESH_S)
        for ref in ready:
            member, index = running.pop(ref)
            member.load -= cores_in(batches[index])
            try:
                sums[index] = ray.get(ref)
            except lost:
                pools.drop(member)
                queue.appendleft(index)
                upkeep.look_now()
    return np.sum([sums[index] for index in range(len(batches))], axis=0)


class KeptActors:
    """Actor pools kept for a Ray session: the scenes of a batch share the actors, and with them each
    actor's start and model load (seconds per actor on a CPU, more with a GPU's context)."""

    def __init__(self, ray: Any, keep_warm_s: float = 0.0) -> None:
        self.ray = ray
        self.keep_warm_s = keep_warm_s
        self.kept: dict[tuple[str, bool, str, bool, float], ActorPools] = {}
        # pools started ahead of their scene (``start``): the scene that first uses them counts their actors
        self.unclaimed: set[tuple[str, bool, str, bool, float]] = set()

    def start(self, checkpoint: Path, checkpoint_sha256: str, spec: WorkSpec, gpus_per_model: float) -> None:
        """Create a scene's actors now, before it is staged: Ray starts them in the background, so their
        start, model load and preparation overlap the staging instead of delaying the first window."""
        key = self._key(checkpoint_sha256, spec, gpus_per_model)
        if key in self.kept:
            return
        pools = self.kept[key] = self._pools(checkpoint, checkpoint_sha256, spec, gpus_per_model, PoolStats())
        pools.refresh()
        self.unclaimed.add(key)

    @staticmethod
    def _key(
        checkpoint_sha256: str, spec: WorkSpec, gpus_per_model: float
    ) -> tuple[str, bool, str, bool, float]:
        return (checkpoint_sha256, spec.crf is not None, spec.device, spec.amp, gpus_per_model)

    def pools(
        self,
        checkpoint: Path,
        checkpoint_sha256: str,
        spec: WorkSpec,
        gpus_per_model: float,
        stats: PoolStats,
    ) -> ActorPools:
        """The pools for this checkpoint and actor shape, started at first use; ``stats`` counts for the
        scene now computing."""
        key = self._key(checkpoint_sha256, spec, gpus_per_model)
        pools = self.kept.get(key)
        if pools is None:
            pools = self.kept[key] = self._pools(checkpoint, checkpoint_sha256, spec, gpus_per_model, stats)
        if key in self.unclaimed:
            self.unclaimed.discard(key)
            stats.actors_started.update(pools.stats.actors_started)
            stats.actors_reused.update(pools.stats.actors_reused)
        pools.stats = stats
        return pools

    def _pools(
        self, checkpoint: Path, sha256: str, spec: WorkSpec, gpus_per_model: float, stats: PoolStats
    ) -> ActorPools:
        return ActorPools(
            self.ray,
            str(checkpoint),
            spec,
            gpus_per_model,
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
    gpus_per_model: float = 1.0,
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
        gpus_per_model,
        stats,
        keep_warm_s=keep_warm_s,
        checkpoint_sha256=checkpoint_sha256,
    )
    try:
        yield pools
    finally:
        pools.close()
