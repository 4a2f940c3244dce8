"""Compute as a backend: given a staged scene and a progress sink, a ``Compute`` computes the cores still to
do into the scene's ledger and says what ran. ``LocalCompute`` runs the workers in this process; a cluster
backend (Ray's ``RayCompute``) is another subclass, found by its name (``engine.backends``).

The base class holds what every backend shares, once: the scene's turn on the backend, its progress lines,
what each window goes through (``window_spec``) and the ``--context scene`` pass, whose pooled features are
kept beside the ledger. A backend supplies its workers for one scene (a ``CorePass``): the context sums of a
list of cores, and the cores themselves.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import numpy as np

from deeplab_common.atomic import write_text_atomically
from pipeline.crf import CPU_DEFAULT
from pipeline.engine.backends import load_backend
from pipeline.engine.grid import PendingCore, cores_to_compute
from pipeline.engine.options import SegmentOptions
from pipeline.engine.plan import CoreDone, Progress
from pipeline.engine.scenes import ComputedScene, ComputeRun, PlannedScene, StagedScene
from pipeline.engine.workers import (
    CRFWorker,
    ModelWorker,
    WindowSpec,
    context_of,
    local_context_sums,
    read_windows,
    tiles_of,
    window_batches,
    write_core,
)

CONTEXT_FILE = "context.json"  # the scene's pooled features under its staging folder, with their ledger key


def window_spec(planned: PlannedScene, options: SegmentOptions) -> WindowSpec:
    """What each window of the scene goes through (before any scene context)."""
    plan = planned.plan
    return WindowSpec(
        crf=plan.crf,
        crf_backend=plan.crf_backend or CPU_DEFAULT,
        crf_device=options.crf_device,
        input_max=planned.checkpoint.metadata.input_max,
        scales=plan.multiscale.scales,
        fuse=plan.multiscale.fuse,
        tta=plan.tta,
        batch_size=options.batch_size,
        device=options.device,
        amp=options.amp,
        runtime="eager" if plan.scene_context else options.runtime,  # the context is a hook on torch's module
        onnx_cache=options.onnx_cache,
        probabilities=options.probabilities,
    )


class CorePass(ABC):
    """A backend's workers for one scene: both passes run on them (one model load each)."""

    @abstractmethod
    def context_sums(self, cores: list[PendingCore]) -> np.ndarray:
        """``ModelWorker.context_sums`` summed over ``cores`` (the ``--context scene`` pass)."""

    @abstractmethod
    def compute_cores(self, staged: StagedScene, spec: WindowSpec, on_core: CoreDone) -> ComputeRun:
        """Every core of ``staged.todo`` written to ``staged.ledger``, ``on_core`` called after each."""


class Compute(ABC):
    """Where a run computes. Entered once per run (a cluster starts, or is joined, on enter and is left on
    exit); scenes take turns on it: two scenes' workers competing for one cluster's CPUs could each hold half
    of what they need and wait forever."""

    name: ClassVar[str]

    def __init__(
        self,
        options: SegmentOptions,
        work_dir: Path,
        worker_env: dict[str, str] | None = None,
        shared_work_dir: bool = True,
    ) -> None:
        """``work_dir``: the run's ``OUT/.work``; ``worker_env``: variables every worker process needs (a
        cluster's workers do not inherit the driver's environment); ``shared_work_dir``: whether a driver
        resubmitted on another node must find ``work_dir`` there (a local ``--out``; not a bucket's)."""
        self.options = options
        self.work_dir = work_dir
        self.worker_env = worker_env
        self.shared_work_dir = shared_work_dir
        self.turn = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        return None

    def warm(self, planned: PlannedScene) -> None:
        """Start what the scene will need while it is staged (nothing, unless a backend has workers to start).
        Skipped while another scene holds its turn: that scene's workers are up already."""
        if not self.turn.acquire(blocking=False):
            return
        try:
            self.start_workers(planned, window_spec(planned, self.options))
        finally:
            self.turn.release()

    def start_workers(self, planned: PlannedScene, spec: WindowSpec) -> None:
        """Overridden by backends whose workers take long to start (actors loading their model)."""
        return None

    def compute(self, staged: StagedScene, progress: Progress) -> ComputedScene:
        """Every core still to do of ``staged``, in its turn."""
        with self.turn:
            clock = time.perf_counter()
            counts = f"{staged.resumed} resumed, {staged.nodata_cores} nodata"
            progress.stage(staged.name, "compute", f"{len(staged.todo)} cores to compute, {counts}")
            spec = window_spec(staged.planned, self.options)
            on_core = progress.cores(staged.name, len(staged.todo))
            run = ComputeRun()
            if staged.todo:
                with self.workers(staged, spec) as workers:
                    if staged.planned.plan.scene_context:
                        progress.stage(staged.name, "context", "pooled features of the whole scene")
                        spec = replace(spec, context=scene_context(staged, workers))
                    run = workers.compute_cores(staged, spec, on_core)
            return ComputedScene(staged=staged, run=run, seconds=time.perf_counter() - clock)

    @abstractmethod
    def workers(self, staged: StagedScene, spec: WindowSpec) -> AbstractContextManager[CorePass]:
        """The scene's workers, for both of its passes."""


def scene_context(staged: StagedScene, workers: CorePass) -> np.ndarray:
    """The scene's pooled features (``--context scene``) over every valid core, computed once per ledger key
    and kept beside the ledger: a resumed run reuses them, so its cores see the same vector as the first's."""
    path = staged.stores.folder / CONTEXT_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == staged.ledger.key:
            return np.asarray(saved["context"], dtype=np.float64)
    every_core, _ = cores_to_compute(staged.planned.plan.tiles, staged.stores.valid())
    context = context_of(workers.context_sums(every_core))
    write_text_atomically(path, json.dumps({"key": staged.ledger.key, "context": context.tolist()}))
    return context


class LocalCompute(Compute):
    """The workers called in this process, one scene at a time: what ``--engine local`` runs."""

    name = "local"

    @contextmanager
    def workers(self, staged: StagedScene, spec: WindowSpec) -> Iterator[CorePass]:
        model = ModelWorker(
            str(staged.planned.checkpoint.path),
            device=spec.device,
            amp=spec.amp,
            runtime=spec.runtime,
            onnx_cache=spec.onnx_cache,
        )
        yield LocalPass(model, staged.stores.image(), spec.batch_size)


class LocalPass(CorePass):
    """One model worker (and a CRF worker when the CRF runs on the CPU) for a scene, in this process."""

    def __init__(self, model: ModelWorker, image: object, batch_size: int) -> None:
        self.model = model
        self.image = image
        self.batch_size = batch_size

    def context_sums(self, cores: list[PendingCore]) -> np.ndarray:
        return local_context_sums(self.model, self.image, cores, self.batch_size)

    def compute_cores(self, staged: StagedScene, spec: WindowSpec, on_core: CoreDone) -> ComputeRun:
        crf = CRFWorker()
        for batch in window_batches(staged.todo, spec.batch_size):
            windows = read_windows(self.image, batch)
            if spec.crf_on_actors and spec.crf is not None:  # as a CRF actor would: each core on the CPU
                results = self.model.predict_for(windows, spec)
                cores = [
                    [
                        crf.refine_core(
                            result,
                            window,
                            spec.crf,
                            spec.input_max,
                            tile,
                            spec.probabilities,
                            spec.crf_backend,
                        )
                        for tile, _ in members
                    ]
                    for members, window, result in zip(batch, windows, results, strict=True)
                ]
            else:  # the model worker finishes the cores: without the CRF, or with it on its device
                cores = self.model.segment_cores(windows, tiles_of(batch), spec)
            for members, planes_of_window in zip(batch, cores, strict=True):
                for (tile, valid), planes in zip(members, planes_of_window, strict=True):
                    write_core(staged.ledger, tile, valid, planes)
                    on_core()
        return ComputeRun(cores=len(staged.todo), runtimes=[self.model.runtime_name()])


def compute_class(name: str) -> type[Compute]:
    """The backend registered as ``name`` (``--engine``)."""
    backend = load_backend(name)
    if not (isinstance(backend, type) and issubclass(backend, Compute)):
        raise TypeError(f"the compute backend {name!r} is {backend!r}, not a Compute class")
    return backend


@contextmanager
def compute_for(
    options: SegmentOptions,
    work_dir: Path,
    needed: bool,
    worker_env: dict[str, str] | None = None,
    shared_work_dir: bool = True,
) -> Iterator[Compute]:
    """The run's backend, chosen once: ``options.engine``'s, entered (a cluster starts or is joined) only
    when a scene has work; a run that skips every scene starts nothing. Call it from the main thread: Ray's
    signal handlers need it."""
    backend = compute_class(options.engine) if needed else LocalCompute
    with backend(options, work_dir, worker_env, shared_work_dir) as compute:
        yield compute
