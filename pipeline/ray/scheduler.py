"""Cores on the cluster: model actors (GPU when there is one) feed dense-CRF actors, finished cores stream to
the ledger. The driver reads core+halo windows from the staged zarr store and keeps at most ``max_in_flight``
cores outstanding (explicit backpressure), so memory stays bounded whatever the scene size; work lost with a
node or an actor is resubmitted whole."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DeepLabError
from pipeline.engine.grid import Tile
from pipeline.engine.ledger import Ledger
from pipeline.engine.options import WHOLE_GPU
from pipeline.engine.workers import (
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
from pipeline.ray.actor_pools import ActorPools, Member, NodeInfo, lost_work_errors

# Ray puts session_<date>_<pid>/sockets/plasma_store (~61 bytes) under its temp dir; AF_UNIX allows 107.
from pipeline.ray.session import RunStats, actor_pools

_REFRESH_S = 2.0


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
    gpus_per_model_actor: float = WHOLE_GPU,
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
        with actor_pools(ray, checkpoint, spec, gpus_per_model_actor, stats.pools) as own:
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
            if spec.crf_on_actors:
                ref = member.handle.predict_for.remote(windows, spec)
            else:  # the model actor finishes the cores: without the CRF, or with it on its device
                ref = member.handle.segment_cores.remote(windows, tiles_of(batches[index]), spec)
            cores = cores_in(batches[index])
            member.load += cores
            model_jobs[ref] = _ModelJob(member, index, windows, cores)
        while crf_waiting and (member := pools.least_loaded("crf", crf_waiting[0].near)) is not None:
            job = crf_waiting.popleft()
            job.member = member
            member.load += 1
            ref = member.handle.refine_core.remote(
                job.probabilities,
                job.window,
                spec.crf,
                spec.input_max,
                job.tile,
                spec.probabilities,
                spec.crf_backend,
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
                    for index, (tile, valid) in enumerate(members):
                        if spec.crf_on_actors and spec.crf is not None:
                            # cut here, not in the CRF actor: only the CRF's reach travels to it
                            crf_tile, probabilities, crf_window = crf_inputs(tile, result, window, spec.crf)
                            crf_waiting.append(
                                _CRFJob(crf_tile, valid, probabilities, crf_window, model_job.member.node)
                            )
                        else:
                            done(tile, valid, result[index], label)
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
    stats.runtimes = pools.model_runtimes()
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
