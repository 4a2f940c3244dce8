"""The Ray backend: a cluster session for the run (started on loopback, or joined), actors kept for all its
scenes, and each scene's passes on them: the scene-context pass and the cores (``pipeline.ray.scheduler``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from pipeline.engine.compute import Compute, CorePass
from pipeline.engine.grid import PendingCore
from pipeline.engine.options import SegmentOptions
from pipeline.engine.plan import CoreDone
from pipeline.engine.scenes import ComputeRun, PlannedScene, StagedScene
from pipeline.engine.workers import WindowSpec
from pipeline.ray.actor_pools import ActorPools
from pipeline.ray.scheduler import CoreScheduler, scene_context_sums
from pipeline.ray.session import KeptActors, RunStats, kept_actors, ray_session
from pipeline.ray.storage import StorageCheck


class RayCompute(Compute):
    """Model actors (GPU when there is one) feeding CRF actors across a Ray cluster; ``--engine ray``."""

    name = "ray"

    def __init__(
        self,
        options: SegmentOptions,
        work_dir: Path,
        worker_env: dict[str, str] | None = None,
        shared_work_dir: bool = True,
    ) -> None:
        super().__init__(options, work_dir, worker_env, shared_work_dir)
        self._stack = ExitStack()
        self.ray: Any = None
        self.actors: KeptActors | None = None

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.ray = stack.enter_context(
                ray_session(self.work_dir, self.options.ray_address, worker_env=self.worker_env)
            )
            # kept for the whole run: its scenes share the actors' model loads
            self.actors = stack.enter_context(kept_actors(self.ray, self.options.keep_warm_s))
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stack.close()

    def start_workers(self, planned: PlannedScene, spec: WindowSpec) -> None:
        """The scene's actors, created now: Ray starts them in the background, so their start and model load
        overlap the staging instead of delaying the first window."""
        checkpoint = planned.checkpoint
        self._kept().start(checkpoint.path, checkpoint.sha256, spec, self.options.gpus_per_model_actor)

    @contextmanager
    def workers(self, staged: StagedScene, spec: WindowSpec) -> Iterator[CorePass]:
        checkpoint = staged.planned.checkpoint
        stats = RunStats()
        actors = self._kept()
        pools = actors.pools(
            checkpoint.path, checkpoint.sha256, spec, self.options.gpus_per_model_actor, stats.pools
        )
        # started before the first window is sent, so that it runs while the actors load their models
        folder = staged.stores.folder if self.shared_work_dir else None
        storage = StorageCheck(self.ray, folder, pools.shipped(), checkpoint.sha256)
        try:
            yield RayPass(self, pools, stats, storage, staged.stores.image())
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the session ends the actors with it
            actors.abandon()
            raise
        finally:
            actors.discard_unless_idle(pools)  # a failed scene's windows may still be queued on them

    def _kept(self) -> KeptActors:
        if self.actors is None:
            raise RuntimeError("RayCompute is used outside its `with` block: no Ray session")
        return self.actors


class RayPass(CorePass):
    """One scene's passes on the run's kept actor pools."""

    def __init__(
        self, compute: RayCompute, pools: ActorPools, stats: RunStats, storage: StorageCheck, image: Any
    ) -> None:
        self.compute = compute
        self.pools = pools
        self.stats = stats
        self.storage = storage
        self.image = image

    def context_sums(self, cores: list[PendingCore]) -> np.ndarray:
        return scene_context_sums(
            self.compute.ray, self.image, cores, self.pools, before_work=self.storage.result
        )

    def compute_cores(self, staged: StagedScene, spec: WindowSpec, on_core: CoreDone) -> ComputeRun:
        options = self.compute.options
        cores = CoreScheduler(
            self.compute.ray,
            self.image,
            staged.todo,
            staged.ledger,
            spec,
            self.pools,
            max_in_flight=options.max_in_flight,
            on_core=on_core,
            stats=self.stats,
            before_work=self.storage.result,
        ).run()
        return ComputeRun(
            cores=cores,
            runtimes=self.stats.runtimes,
            actor_memory=self.stats.actor_memory,
            cluster=self.stats.report(),
        )
