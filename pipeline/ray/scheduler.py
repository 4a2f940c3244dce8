"""Cores on the cluster: model actors (GPU when there is one) feed dense-CRF actors, finished cores stream to
the ledger. The driver reads core+halo windows from the staged zarr store and keeps at most ``max_in_flight``
cores outstanding (explicit backpressure), so memory stays bounded whatever the scene size; work lost with a
node or an actor is resubmitted whole."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deeplab_common.errors import ClusterError
from pipeline.engine.grid import PendingCore, Tile
from pipeline.engine.ledger import Ledger
from pipeline.engine.plan import CoreDone
from pipeline.engine.workers import (
    WindowSpec,
    cores_in,
    crf_inputs,
    read_windows,
    tiles_of,
    window_batches,
    write_core,
)
from pipeline.ray.actor_pools import ActorPools, Member, NodeInfo, lost_work_errors
from pipeline.ray.session import RunStats

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
            raise ClusterError(why())
        time.sleep(_REFRESH_S)
        self.look_now()

    def working(self) -> None:
        self.starved_since = None


class CoreScheduler:
    """One scene's cores through the model actors of ``pools`` (left running) and, when the CRF runs on its
    own actors, the CRF actors: batches queued, sent as actors free up, their results taken as they come,
    each finished core written to the ledger.

    Windows in flight are bounded (``max_in_flight``, else twice what the actors can hold). Work on an actor
    or node that is lost is resubmitted to the remaining ones; the cores written never depend on which node
    computed them. ``stats`` receives windows per node, losses and each actor's peak RSS. ``before_work`` runs
    once the first actors are being created, before any window is sent (a check that may refuse the run).
    """

    def __init__(
        self,
        ray: Any,
        image: Any,
        todo: list[PendingCore],
        ledger: Ledger,
        spec: WindowSpec,
        pools: ActorPools,
        *,
        max_in_flight: int | None = None,
        on_core: CoreDone | None = None,
        stats: RunStats | None = None,
        node_wait_s: float = 120.0,
        before_work: Callable[[], None] | None = None,
    ) -> None:
        self.ray, self.image, self.todo, self.ledger, self.spec = ray, image, todo, ledger, spec
        self.pools, self.stats, self.on_core = pools, stats or RunStats(), on_core
        self.max_in_flight = max_in_flight
        self.upkeep = _Upkeep(pools, node_wait_s, before_work)
        self.lost = lost_work_errors(ray)
        self.batches = window_batches(todo, spec.batch_size)
        self.queue = deque(range(len(self.batches)))  # batch indices: a lost batch is sent again whole
        self.model_jobs: dict[Any, _ModelJob] = {}
        self.crf_waiting: deque[_CRFJob] = deque()
        self.crf_jobs: dict[Any, _CRFJob] = {}
        self.finished = 0

    def run(self) -> int:
        """Every core of ``todo`` computed and written; returns how many."""
        upkeep, batch_size = self.upkeep, self.spec.batch_size
        while self.finished < len(self.todo):
            upkeep.tick()
            self.send_windows(self.max_in_flight or max(self.pools.capacity(batch_size), batch_size))
            self.send_crf_jobs()
            if not self.model_jobs and not self.crf_jobs:
                upkeep.starving(self.starved_line)
                continue
            upkeep.working()
            ready, _ = self.ray.wait([*self.model_jobs, *self.crf_jobs], num_returns=1, timeout=_REFRESH_S)
            for ref in ready:
                if ref in self.model_jobs:
                    self.take_model_result(ref)
                else:
                    self.take_crf_result(ref)
        self.stats.actor_memory = self.pools.peak_rss()
        self.stats.runtimes = self.pools.model_runtimes()
        self.pools.refresh(place=False)  # a node lost late is reported even when its work was redone already
        return len(self.todo)

    def in_flight(self) -> int:
        return sum(j.cores for j in self.model_jobs.values()) + len(self.crf_jobs) + len(self.crf_waiting)

    def send_windows(self, limit: int) -> None:
        """Batches of windows to the least loaded model actors, while fewer than ``limit`` cores are out."""
        while self.queue and self.in_flight() < limit and (member := self.pools.least_loaded("model")):
            index = self.queue.popleft()
            batch = self.batches[index]
            windows = read_windows(self.image, batch)
            if self.spec.crf_on_actors:
                ref = member.handle.predict_for.remote(windows, self.spec)
            else:  # the model actor finishes the cores: without the CRF, or with it on its device
                ref = member.handle.segment_cores.remote(windows, tiles_of(batch), self.spec)
            cores = cores_in(batch)
            member.load += cores
            self.model_jobs[ref] = _ModelJob(member, index, windows, cores)

    def send_crf_jobs(self) -> None:
        """Waiting cores to CRF actors, the model's node first (no transfer there)."""
        spec = self.spec
        while self.crf_waiting and (member := self.pools.least_loaded("crf", self.crf_waiting[0].near)):
            job = self.crf_waiting.popleft()
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
            self.crf_jobs[ref] = job

    def starved_line(self) -> str:
        kind = "CRF" if self.crf_waiting else "model"
        return (
            f"no live Ray node can run the {kind} actors: {len(self.todo) - self.finished} cores left after "
            f"waiting {self.upkeep.node_wait_s:.0f} s for a node"
        )

    def take_model_result(self, ref: Any) -> None:
        job = self.model_jobs.pop(ref)
        job.member.load -= job.cores
        try:
            results = self.ray.get(ref)
        except self.lost:
            self.lose(job.member, job.cores)
            self.queue.appendleft(job.batch)
            return
        label = job.member.node.label
        self.stats.pools.cores[(label, "model")] += job.cores
        crf = self.spec.crf if self.spec.crf_on_actors else None
        for members, window, result in zip(self.batches[job.batch], job.windows, results, strict=True):
            for index, (tile, valid) in enumerate(members):
                if crf is not None:
                    # cut here, not in the CRF actor: only the CRF's reach travels to it
                    crf_tile, probabilities, crf_window = crf_inputs(tile, result, window, crf)
                    self.crf_waiting.append(
                        _CRFJob(crf_tile, valid, probabilities, crf_window, job.member.node)
                    )
                else:
                    self.done(tile, valid, result[index], label)

    def take_crf_result(self, ref: Any) -> None:
        job = self.crf_jobs.pop(ref)
        assert job.member is not None
        job.member.load -= 1
        try:
            planes = self.ray.get(ref)
        except self.lost:
            self.lose(job.member, 1)
            job.member = None
            self.crf_waiting.appendleft(job)
            return
        label = job.member.node.label
        self.stats.pools.cores[(label, "crf")] += 1
        self.done(job.tile, job.valid, planes, label)

    def lose(self, member: Member, cores: int) -> None:
        """An actor (or its node) is gone: stop using it; its ``cores`` are queued again by the caller."""
        self.pools.drop(member)
        self.stats.pools.cores_retried += cores
        self.upkeep.look_now()

    def done(self, tile: Tile, valid: np.ndarray | None, planes: np.ndarray, node: str) -> None:
        write_core(self.ledger, tile, valid, planes, node=node)
        self.finished += 1
        if self.on_core:
            self.on_core()


def scene_context_sums(
    ray: Any,
    image: Any,
    todo: list[PendingCore],
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
