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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.grid import Tile, core_of, read_padded
from pipeline.ledger import Ledger
from pipeline.workers import (
    CoreDone,
    CRFWorker,
    ModelWorker,
    Work,
    WorkSpec,
    same_shape_batches,
    write_core,
)

# Ray puts session_<date>_<pid>/sockets/plasma_store (~61 bytes) under its temp dir; AF_UNIX allows 107.
_MAX_SOCKET_PATH = 40


@dataclass(frozen=True)
class ActorPlan:
    model_actors: int
    crf_actors: int
    model_cpus: float
    crf_cpus: float
    model_gpus: float
    model_threads: int

    @classmethod
    def for_resources(cls, cpus: float, gpus: float, crf: bool) -> ActorPlan:
        """GPU: one model actor per GPU. CPU: one model actor; the rest of the CPUs refine."""
        if gpus >= 1:
            return cls(int(gpus), max(1, int(cpus) - 1) if crf else 0, 0.5, 1.0, 1.0, 1)
        if not crf:
            return cls(1, 0, max(1.0, float(int(cpus))), 0.0, 0.0, max(1, int(cpus)))
        # Fractional CPUs so that the model actor and the CRF actors fit on a 2-core machine together.
        crf_actors = max(1, int(cpus) - 1) if cpus >= 3 else 1
        return cls(1, crf_actors, 0.5, 0.5 if cpus < 3 else 1.0, 0.0, max(1, int(cpus) // 2))


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
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
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


def run_tiles(
    ray: Any,
    image: Any,
    todo: list[Work],
    ledger: Ledger,
    checkpoint: Path,
    plan: ActorPlan,
    spec: WorkSpec,
    max_in_flight: int,
    on_core: CoreDone | None = None,
    actor_memory: dict[str, list[float]] | None = None,
) -> int:
    """Compute every core in ``todo`` on actors, writing each to the ledger as it completes.

    ``actor_memory``, when given, receives each actor's peak RSS in MB (``model``, ``crf``) at the end.
    """
    if not todo:
        return 0
    model_cls = ray.remote(num_cpus=plan.model_cpus, num_gpus=plan.model_gpus)(ModelWorker)
    models = [
        model_cls.remote(str(checkpoint), spec.device, plan.model_threads, spec.amp)
        for _ in range(plan.model_actors)
    ]
    crf_cls = ray.remote(num_cpus=plan.crf_cpus)(CRFWorker) if spec.crf else None
    crfs = [crf_cls.remote() for _ in range(plan.crf_actors)] if crf_cls else []
    batches = same_shape_batches(todo, spec.batch_size)
    model_jobs: dict[Any, tuple[list[Work], list[np.ndarray]]] = {}
    crf_jobs: dict[Any, Work] = {}
    submitted = finished = 0
    next_batch = 0

    def done(tile: Tile, valid: np.ndarray | None, planes: np.ndarray) -> None:
        nonlocal finished
        write_core(ledger, tile, valid, planes)
        finished += 1
        if on_core:
            on_core()

    try:
        while finished < len(todo):
            while (
                next_batch < len(batches)
                and len(model_jobs) * spec.batch_size + len(crf_jobs) < max_in_flight
            ):
                group = batches[next_batch]
                windows = [read_padded(image, tile) for tile, _ in group]
                actor = models[next_batch % len(models)]
                ref = actor.predict.remote(
                    windows, spec.scales, spec.fuse, spec.crf is not None, spec.with_confidence
                )
                model_jobs[ref] = (group, windows)
                next_batch += 1
            ready, _ = ray.wait([*model_jobs, *crf_jobs], num_returns=1)
            for ref in ready:
                if ref in model_jobs:
                    group, windows = model_jobs.pop(ref)
                    for (tile, valid), window, result in zip(group, windows, ray.get(ref), strict=True):
                        if spec.crf is not None:
                            crf_ref = crfs[submitted % len(crfs)].refine_core.remote(
                                result, window, spec.crf, spec.input_max, tile, spec.with_confidence
                            )
                            crf_jobs[crf_ref] = (tile, valid)
                            submitted += 1
                        else:
                            done(tile, valid, core_of(result, tile))
                else:
                    tile, valid = crf_jobs.pop(ref)
                    done(tile, valid, ray.get(ref))
        if actor_memory is not None:
            actor_memory["model"] = ray.get([a.peak_rss_mb.remote() for a in models])
            actor_memory["crf"] = ray.get([a.peak_rss_mb.remote() for a in crfs])
    finally:
        for actor in [*models, *crfs]:
            ray.kill(actor)
    return len(todo)
