"""Actors left warm on a running cluster between runs (``--keep-warm-s``), and how runs find or evict them.

A run that ends leaves its model and CRF actors up, named and detached, for ``keep_warm_s``: the next run of
the same checkpoint and actor shape on that cluster (the next ``ray job submit``, flow run or command) takes
them as they are, with the model loaded, prepared and past its first forward. Each actor ends itself once
it has been idle that long, so a cluster is never held for good. A run that needs a node's resources for
other actors first stops the idle warm actors of other shapes there; busy ones are left alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, ParamSpec, TypeVar

from pipeline.engine.workers import peak_rss_mb

NAMESPACE = "deeplab-warm"
_PREFIX = "deeplab-"
_WATCH_S = 1.0  # how often an actor left warm looks at its idle time
_IDLE_ENOUGH_S = 2.0  # an actor idle this long is not in the middle of another run's batch


_P = ParamSpec("_P")
_R = TypeVar("_R")


def working(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Marks a method of a ``Warmable`` as work: the actor is not idle while it runs, nor right after."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        actor = args[0]
        assert isinstance(actor, Warmable)
        actor._busy += 1
        try:
            return method(*args, **kwargs)
        finally:
            actor._busy -= 1
            actor._last_use = time.monotonic()

    return run


class Warmable:
    """Mixed into the actor classes, whose work methods are ``working``; ``stay_warm`` starts the idle
    clock."""

    _busy: int = 0
    _last_use: float = 0.0
    _idle_limit_s: float | None = None
    _watchdog: threading.Thread | None = None

    def idle_seconds(self) -> float:
        if self._busy:
            return 0.0
        return time.monotonic() - self._last_use if self._last_use else float("inf")

    def stay_warm(self, idle_limit_s: float) -> float:
        """End this actor after ``idle_limit_s`` without work (a later call sets a new limit); returns its
        peak RSS in MB, as a run's first call to an actor it reuses."""
        self._last_use = time.monotonic()
        self._idle_limit_s = idle_limit_s
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="deeplab-idle-exit", daemon=True)
            self._watchdog.start()
        return peak_rss_mb()

    def _watch(self) -> None:
        while self._idle_limit_s is None or self.idle_seconds() < self._idle_limit_s:
            time.sleep(_WATCH_S)
        import ray

        # no_restart: an actor that ends for being idle must not come back
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


_W = TypeVar("_W")


def warmable(worker: type[_W], name: str, module: str, work_methods: tuple[str, ...]) -> type[_W]:
    """``worker`` (a plain engine class) as an actor class with an idle clock: its ``work_methods`` are
    ``working``. ``name`` and ``module`` say where the class is bound, so Ray pickles it by reference."""
    namespace: dict[str, Any] = {method: working(getattr(worker, method)) for method in work_methods}
    namespace |= {"__module__": module, "__qualname__": name}
    return type(name, (Warmable, worker), namespace)


def shape_key(checkpoint_sha256: str, kind: str, shape: dict[str, Any]) -> str:
    """Short digest of what makes two runs' actors interchangeable: the weights, the kind, and the actor's
    resources, threads, device and precision (``shape``)."""
    from deeplab_common.version import software_version

    text = json.dumps([checkpoint_sha256, kind, shape, software_version()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def actor_name(kind: str, key: str, node_id: str, index: int) -> str:
    return f"{_PREFIX}{kind}-{key}-{node_id[:16]}-{index}"


def _key_and_node(name: str) -> tuple[str, str]:
    """The shape key and node part of a name ``actor_name`` made (empty for any other name)."""
    parts = name.split("-")
    return (parts[2], parts[3]) if len(parts) == 5 and name.startswith(_PREFIX) else ("", "")


def find(ray: Any, name: str) -> Any | None:
    """The live warm actor of this name, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def evict_idle(ray: Any, node_id: str, keep_keys: set[str]) -> int:
    """Stop the idle warm actors on ``node_id`` whose shape is none of ``keep_keys``, so that their resources
    go to the actors a run is about to start there; returns how many were stopped."""
    from ray.util import list_named_actors

    stopped = 0
    for entry in list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE:
            continue
        name = entry.get("name", "")
        key, node = _key_and_node(name)
        if not key or key in keep_keys or node != node_id[:16] or (handle := find(ray, name)) is None:
            continue
        # an actor working for another run answers only after its batch: not idle, left alone
        with suppress(Exception):
            if ray.get(handle.idle_seconds.remote(), timeout=1.0) >= _IDLE_ENOUGH_S:
                ray.kill(handle, no_restart=True)
                stopped += 1
    return stopped
