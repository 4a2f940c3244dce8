"""The run's Ray session: start a local cluster (loopback only, token auth, its own temp dir, dashboard and
usage stats off) or join one; the actors a run keeps for all its scenes; what a run saw on the cluster."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeplab_common.errors import ClusterError
from deeplab_common.signals import sigterm_kept
from pipeline.engine.outdir import RAY_OWNER, RAY_PREFIX
from pipeline.engine.workers import (
    WindowSpec,
)
from pipeline.ray.actor_pools import ActorPools, PoolStats

LOOPBACK = "127.0.0.1"
AUTH_MODE, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"
_CLUSTERS_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read once, at import, as ENABLE_RAY_CLUSTER

# Ray puts session_<date>_<pid>/sockets/plasma_store (~61 bytes) under its temp dir; AF_UNIX allows 107.


_MAX_SOCKET_PATH = 40


# How often the pools look for nodes that joined or died, and the longest a wait for results blocks.
@dataclass
class RunStats:
    """What a run on the cluster saw, for the report: where cores ran, what was lost, actors' memory."""

    pools: PoolStats = field(default_factory=PoolStats)
    actor_memory: dict[str, list[float]] = field(default_factory=dict)
    runtimes: list[str] = field(default_factory=list)  # the model actors' (``ModelWorker.runtime_name``)

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
    """A fresh folder for this run's Ray session: under the work dir when its path is short enough for
    Ray's sockets, else in the system's temp dir with its owner recorded, so that a later run into the same
    output folder removes it if this run dies (``pipeline.engine.outdir.clean_debris``)."""
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if len(str(work)) + len(f"/{RAY_PREFIX}") + 8 <= _MAX_SOCKET_PATH:  # mkdtemp adds 8 characters
        return tempfile.mkdtemp(prefix=RAY_PREFIX, dir=work)
    folder = tempfile.mkdtemp(prefix="deeplab-ray-")
    (Path(folder) / RAY_OWNER).write_text(f"{work.parent}\n{os.getpid()}\n")
    return folder


@contextmanager
def loopback_node() -> Iterator[None]:
    """Start a local cluster whose every server listens on loopback alone.

    Ray 2.60 binds a node's gRPC servers, agents and metrics exporters to loopback when the node's IP is
    exactly 127.0.0.1, yet ``ray.init`` swaps 127.0.0.1 for the machine's routable address
    (``services.resolve_ip_for_localhost``) unless multi-machine clusters are off, as they are by default on
    macOS and Windows (``ray_constants.ENABLE_RAY_CLUSTER``). They are off while this cluster starts: in this
    process, and in the cluster's processes through the variable they inherit. A driver joining a remote
    cluster later in this process is untouched. ``tests/test_exposure.py`` fails if a Ray upgrade changes it.
    """
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(_CLUSTERS_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(_CLUSTERS_VAR, None)
        else:
            os.environ[_CLUSTERS_VAR] = saved_env


@contextmanager
def token_auth(temp_dir: str) -> Iterator[None]:
    """Token authentication (Ray >= 2.52) for the cluster this run starts, with a fresh token of its own in
    its temp dir (0600), whatever the environment says: a user's RAY_AUTH_MODE=disabled would open every
    port of the cluster to any local user, so it is overridden, loudly. A token the user set in
    RAY_AUTH_TOKEN is used as it is."""
    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode.strip().lower() != "token":
        warnings.warn(
            f"{AUTH_MODE}={mode} is ignored for the Ray cluster this run starts: it uses token "
            "authentication. To run without it, start a cluster yourself and pass --ray-address.",
            stacklevel=4,
        )
        del os.environ[AUTH_MODE]  # unset, ray.init turns token auth on for the cluster it starts
    token = Path(temp_dir) / "auth_token"
    handle = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "w") as sink:
        sink.write(secrets.token_hex(32))
    saved = os.environ.get(TOKEN_PATH)
    os.environ[TOKEN_PATH] = str(token)
    _forget_cached_token()
    # ray.init says on the terminal that it turned token auth on, which is this function's job, not news
    announcer = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = announcer.level
    announcer.setLevel(logging.ERROR)
    try:
        yield
    finally:
        announcer.setLevel(level)
        if saved is None:
            os.environ.pop(TOKEN_PATH, None)
        else:
            os.environ[TOKEN_PATH] = saved
        _forget_cached_token()


def _forget_cached_token() -> None:
    """Ray's token loader caches the first token it reads for the process: a later session's is another."""
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def ray_session(
    work_dir: Path,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    worker_env: dict[str, str] | None = None,
    log_to_driver: bool = False,
) -> Iterator[Any]:
    """Join a cluster or start a local one; a local one is shut down again on exit.

    A local cluster binds to loopback only (every Ray server listens on the node IP, 127.0.0.1) and uses
    token authentication; its temp dir is this run's own and is removed at the end.
    ``worker_env`` is set in every worker and actor of this job (a cluster's workers do not inherit the
    driver's environment). ``log_to_driver``: the workers' output is printed here too (training's epoch
    lines); the engine's runs keep their own progress lines instead.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield ray
        return
    temp_dir = None
    stack = ExitStack()
    runtime_env = {"env_vars": dict(worker_env)} if worker_env else None
    if address:
        try:
            with sigterm_kept():
                ray.init(
                    address=address,
                    log_to_driver=log_to_driver,
                    configure_logging=False,
                    runtime_env=runtime_env,
                )
        except ray.exceptions.AuthenticationError as exc:
            raise ClusterError(
                f"the Ray cluster at {address} refused this client: {str(exc).splitlines()[0]} "
                "It runs with token authentication: set RAY_AUTH_MODE=token and the cluster's token in "
                "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)"
            ) from exc
    else:
        temp_dir = ray_temp_dir(work_dir)
        stack.enter_context(token_auth(temp_dir))
        with loopback_node(), sigterm_kept():
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                configure_logging=False,
                _temp_dir=temp_dir,
                _node_ip_address=LOOPBACK,
                runtime_env=runtime_env,
            )
    try:
        yield ray
    finally:
        ray.shutdown()
        stack.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)  # this run's alone: leave nothing


# what makes actors reusable by the next run: checkpoint, CRF actors or not, device, AMP, GPU share, runtime
PoolsKey = tuple[str, bool, str, bool, float, str | None]


class KeptActors:
    """Actor pools kept for a Ray session: the scenes of a batch share the actors, and with them each
    actor's start and model load (seconds per actor on a CPU, more with a GPU's context)."""

    def __init__(self, ray: Any, keep_warm_s: float = 0.0) -> None:
        self.ray = ray
        self.keep_warm_s = keep_warm_s
        self.kept: dict[PoolsKey, ActorPools] = {}
        # pools started ahead of their scene (``start``): the scene that first uses them counts their actors
        self.unclaimed: set[PoolsKey] = set()

    def start(
        self, checkpoint: Path, checkpoint_sha256: str, spec: WindowSpec, gpus_per_model_actor: float
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
    def _key(checkpoint_sha256: str, spec: WindowSpec, gpus_per_model_actor: float) -> PoolsKey:
        return (
            checkpoint_sha256,
            spec.crf_on_actors,
            spec.device,
            spec.amp,
            gpus_per_model_actor,
            spec.runtime,
        )

    def pools(
        self,
        checkpoint: Path,
        checkpoint_sha256: str,
        spec: WindowSpec,
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
        self, checkpoint: Path, sha256: str, spec: WindowSpec, gpus_per_model_actor: float, stats: PoolStats
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

    def abandon(self) -> None:
        """Forget every actor without stopping it (an interrupted run): the session's shutdown ends them
        with the job, whereas a kill each would have Ray print a line per task it was running."""
        for pools in self.kept.values():
            pools.members.clear()
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
    spec: WindowSpec,
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
