"""Model and CRF actors placed on the cluster's live nodes, sized by each node's resources.

Every actor is pinned to one node (hard node affinity), so the pools know where each window is computed and
can follow the cluster: a node that joins (an autoscaler added it) gets its actors at the next refresh, and
the actors of a node that died are dropped; the engine resubmits their windows elsewhere.
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.engine.options import WHOLE_GPU
from pipeline.engine.workers import CRFWorker, ModelWorker, WindowSpec
from pipeline.ray import warm_actors

# the engine's plain workers as actor classes that keep an idle clock (for warm actors)
ModelActor = warm_actors.warmable(
    ModelWorker, "ModelActor", __name__, ("predict", "segment_cores", "context_sums")
)
CRFActor = warm_actors.warmable(CRFWorker, "CRFActor", __name__, ("refine_core",))

_MAX_REPLACEMENTS_PER_NODE = 2


@dataclass(frozen=True)
class ActorPlan:
    """The actors one node runs and what each requests."""

    model_actors: int
    crf_actors: int
    model_cpus: float
    crf_cpus: float
    model_gpus: float
    model_threads: int

    @classmethod
    def for_resources(
        cls,
        cpus: float,
        gpus: float,
        crf: bool,
        cluster_has_gpus: bool = False,
        gpus_per_model_actor: float = WHOLE_GPU,
    ) -> ActorPlan:
        """GPU node: ``1 / gpus_per_model_actor`` model actors per GPU, CRF on its other CPUs. CPU node of a
        GPU cluster: CRF only (inference belongs on the GPUs). CPU cluster: one model actor per node, the
        rest of its CPUs refine."""
        if gpus > 0:
            model_actors = (
                max(1, int(gpus / gpus_per_model_actor + 1e-9)) if gpus >= gpus_per_model_actor else 0
            )
            model_cpus = 0.5
            spare = int(cpus - model_actors * model_cpus)
            return cls(model_actors, max(0, spare) if crf else 0, model_cpus, 1.0, gpus_per_model_actor, 1)
        if cluster_has_gpus:
            return cls(0, int(cpus) if crf else 0, 0.0, 1.0, 0.0, 1)
        if cpus < 0.5:
            return cls(0, 0, 0.0, 0.0, 0.0, 1)  # e.g. a head started with --num-cpus 0
        if not crf:
            return cls(1, 0, max(0.5, float(int(cpus))), 0.0, 0.0, max(1, int(cpus)))
        if cpus < 1:
            return cls(1, 1, cpus / 2, cpus / 2, 0.0, 1)
        # Fractional CPUs so that the model actor and a CRF actor share a small node.
        crf_actors = max(1, int(cpus) - 1) if cpus >= 3 else 1
        return cls(1, crf_actors, 0.5, 0.5 if cpus < 3 else 1.0, 0.0, max(1, int(cpus) // 2))

    def threads_without_crf(self, cpus: float) -> int:
        """Torch threads of a model actor while the node's CRF actors have nothing to do (the scene-context
        pass): on a CPU node the model actors share all its CPUs; a GPU actor keeps its one thread."""
        if self.model_gpus > 0 or self.model_actors == 0:
            return self.model_threads
        return max(self.model_threads, int(cpus) // self.model_actors)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    cpus: float
    gpus: float

    @property
    def label(self) -> str:
        # several nodes share one address on a single machine: the id tells them apart
        return f"{self.address} {self.node_id[:8]}"


def live_nodes(ray: Any) -> list[NodeInfo]:
    return [
        NodeInfo(
            node["NodeID"],
            node.get("NodeManagerAddress", "?"),
            float(node.get("Resources", {}).get("CPU", 0.0)),
            float(node.get("Resources", {}).get("GPU", 0.0)),
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]


def lost_work_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors that mean an actor, its node or an object went away: the work is redone elsewhere.

    An exception raised by our own code in an actor (``RayTaskError``) is not among them: it fails the run.
    ``ActorUnschedulableError``: an actor pinned to a node that died before the actor was placed there.
    """
    names = (
        "RayActorError",
        "ActorUnschedulableError",
        "ObjectLostError",
        "OwnerDiedError",
        "WorkerCrashedError",
        "NodeDiedError",
    )
    found = (getattr(ray.exceptions, name, None) for name in names)
    return tuple(kind for kind in found if isinstance(kind, type))


@dataclass
class Member:
    """One actor, the node it lives on, and how many windows it holds now."""

    handle: Any
    kind: str  # "model" or "crf"
    node: NodeInfo
    load: int = 0
    answered: Any = None  # the reference of a first call: done once the actor is up
    ready: bool = False
    warm: bool = False  # named and detached (``warm_actors``): outlives the run unless killed


@dataclass
class PoolStats:
    """What the pools saw: cores per node and kind, actors lost, cores computed again."""

    cores: Counter[tuple[str, str]] = field(default_factory=Counter)
    actors_started: Counter[str] = field(default_factory=Counter)  # by kind: loads of the model, replacements
    actors_reused: Counter[str] = field(default_factory=Counter)  # by kind: warm actors an earlier run left
    actors_lost: int = 0
    cores_retried: int = 0
    nodes_lost: list[str] = field(default_factory=list)

    def by_node(self) -> dict[str, dict[str, int]]:
        nodes: dict[str, dict[str, int]] = {}
        for (label, kind), count in sorted(self.cores.items()):
            nodes.setdefault(label, {})[f"{kind}_cores"] = count
        return nodes


class ActorPools:
    def __init__(
        self,
        ray: Any,
        checkpoint: str,
        spec: WindowSpec,
        gpus_per_model_actor: float = WHOLE_GPU,
        stats: PoolStats | None = None,
        max_restarts: int = 1,
        keep_warm_s: float = 0.0,
        checkpoint_sha256: str | None = None,
    ) -> None:
        """``keep_warm_s`` > 0: the actors are named and detached, and stay up that long idle after the run
        (``warm_actors``); warm actors an earlier run left are taken whatever it is. ``checkpoint_sha256``:
        the caller's, so that the file is not read again (else computed when first needed)."""
        self.ray = ray
        self.checkpoint = checkpoint
        self.spec = spec
        self.gpus_per_model_actor = gpus_per_model_actor
        self.max_restarts = max_restarts
        self.keep_warm_s = keep_warm_s
        self.known_sha256 = checkpoint_sha256
        self._shipped: Any = None  # the checkpoint's bytes in Ray's object store, put once
        self.members: list[Member] = []
        self.placed: dict[str, NodeInfo] = {}  # nodes whose actors were created, by id
        self.plans: dict[str, ActorPlan] = {}
        self.replacements: list[tuple[NodeInfo, str]] = []  # actors lost, to start again on their node
        self.replaced: Counter[str] = Counter()
        self.stats = stats if stats is not None else PoolStats()

    def refresh(self, place: bool = True) -> None:
        """Create actors on nodes that joined and replace lost ones on nodes still alive (unless not
        ``place``); drop the actors of nodes that died."""
        nodes = live_nodes(self.ray)
        alive = {n.node_id: n for n in nodes}
        for node_id, node in self.placed.items():
            if node_id not in alive and node.label not in self.stats.nodes_lost:
                self.stats.nodes_lost.append(node.label)
        for member in [m for m in self.members if m.node.node_id not in alive]:
            self.drop(member, replace=False)
        replacements, self.replacements = self.replacements, []
        self._note_ready()
        if not place:
            return
        cluster_has_gpus = any(n.gpus > 0 for n in nodes)
        for node in nodes:
            if node.node_id in self.placed:
                continue
            plan = ActorPlan.for_resources(
                node.cpus, node.gpus, self.spec.crf_on_actors, cluster_has_gpus, self.gpus_per_model_actor
            )
            if plan.model_actors + plan.crf_actors == 0:
                continue  # nothing fits (yet: a joining node may not have reported its resources)
            self.placed[node.node_id] = node
            self.plans[node.node_id] = plan
            self._place(node, "model", plan.model_actors)
            self._place(node, "crf", plan.crf_actors if self.spec.crf_on_actors else 0)
        # An actor lost on a node that is still alive (its process died twice, it became unreachable) is
        # replaced there, a bounded number of times: a node whose actors keep dying stops getting new ones.
        for node, kind in replacements:
            if node.node_id in alive and self.replaced[node.node_id] < _MAX_REPLACEMENTS_PER_NODE:
                self.replaced[node.node_id] += 1
                self._start(node, kind)

    @cached_property
    def checkpoint_sha256(self) -> str:
        from models.checkpoint import file_sha256

        return self.known_sha256 or file_sha256(Path(self.checkpoint))

    def shipped(self) -> Any:
        """The checkpoint's bytes in Ray's object store: a node fetches them once, however many of its
        actors load them, and needs no path of the driver's (``checkpoint.checkpoint_on_this_node``)."""
        if self._shipped is None:
            self._shipped = self.ray.put(Path(self.checkpoint).read_bytes())
        return self._shipped

    def _shape_key(self, node: NodeInfo, kind: str) -> str:
        plan = self.plans[node.node_id]
        shape = {"plan": asdict(plan), "device": self.spec.device, "amp": self.spec.amp}
        if self.spec.runtime is not None:  # the shapes of actors kept before there was a choice stay valid
            shape["runtime"] = self.spec.runtime
        return warm_actors.shape_key(self.checkpoint_sha256, kind, shape)

    def _place(self, node: NodeInfo, kind: str, count: int) -> None:
        """A newly seen node's actors: warm ones an earlier run left there, else new ones (named and
        detached when the pools keep them warm) after idle warm actors of other shapes make room."""
        if count == 0:
            return
        key = self._shape_key(node, kind)
        names = [warm_actors.actor_name(kind, key, node.node_id, i) for i in range(count)]
        found = [warm_actors.find(self.ray, name) for name in names]
        if not all(found):
            # both kinds' shapes stay: the model actors this run just took are idle too
            ours = {self._shape_key(node, other) for other in ("model", "crf")}
            warm_actors.evict_idle(self.ray, node.node_id, ours)
        for name, handle in zip(names, found, strict=True):
            if handle is not None:
                self.stats.actors_reused[kind] += 1
                first = handle.stay_warm.remote(self.keep_warm_s) if self.keep_warm_s else None
                self._join(Member(handle, kind, node, warm=True), first)
            else:
                self._start(node, kind, name if self.keep_warm_s else None)

    def _start(self, node: NodeInfo, kind: str, warm_name: str | None = None) -> None:
        """One new actor of ``kind`` on ``node``; named and detached under ``warm_name`` if given."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        plan = self.plans[node.node_id]
        # A crashed actor process restarts in place (same node); a lost node is the engine's to handle.
        common: dict[str, Any] = {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_restarts,
        }
        if warm_name is not None:
            common |= {
                "name": warm_name,
                "namespace": warm_actors.NAMESPACE,
                "lifetime": "detached",
                "get_if_exists": True,  # another run may be creating it at this moment
            }
        if kind == "model":
            model_cls = self.ray.remote(ModelActor).options(
                num_cpus=plan.model_cpus, num_gpus=plan.model_gpus, **common
            )
            spec = self.spec
            handle = model_cls.remote(
                self.shipped(),  # resolved on the node: its bytes, fetched there once
                checkpoint_sha256=self.checkpoint_sha256,
                device=spec.device,
                threads=plan.model_threads,
                amp=spec.amp,
                runtime=spec.runtime,
                onnx_cache=spec.onnx_cache,
            )
        else:
            handle = self.ray.remote(CRFActor).options(num_cpus=plan.crf_cpus, **common).remote()
        # a warm actor's idle clock runs from its first call: a driver that dies leaves nothing for good
        first = handle.stay_warm.remote(self.keep_warm_s) if warm_name is not None else None
        self._join(Member(handle, kind, node, warm=warm_name is not None), first)
        self.stats.actors_started[kind] += 1

    def _join(self, member: Member, first: Any | None) -> None:
        member.answered = first if first is not None else member.handle.peak_rss_mb.remote()
        self.members.append(member)

    def _note_ready(self) -> None:
        waiting = {m.answered: m for m in self.members if not m.ready}
        if waiting:
            done, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            for (
                ref
            ) in done:  # an actor that failed to start is "ready" too: its first task fails and is redone
                waiting[ref].ready = True

    def of_kind(self, kind: str) -> list[Member]:
        return [m for m in self.members if m.kind == kind]

    def least_loaded(self, kind: str, near: NodeInfo | None = None) -> Member | None:
        """The actor of ``kind`` with the least work, preferring actors that are up (an actor still starting,
        perhaps on a node that died unnoticed, takes work only when none is up) and ``near``'s node (no
        transfer)."""
        candidates = self.of_kind(kind)
        if not candidates:
            return None
        return min(candidates, key=lambda m: (not m.ready, m.load, near is not None and m.node != near))

    def drop(self, member: Member, replace: bool = True) -> None:
        """Stop using ``member``; unless its node is gone, the next refresh starts another in its place."""
        if member in self.members:
            self.members.remove(member)
            self.stats.actors_lost += 1
            if replace:
                self.replacements.append((member.node, member.kind))
            with suppress(Exception):  # its node may be gone already: nothing left to stop
                self.ray.kill(member.handle, no_restart=True)

    def context_threads(self, member: Member) -> int:
        """Threads for a model actor while the CRF actors wait (the scene-context pass): on a CPU node its
        share of all the node's CPUs, not only of those it keeps beside the CRF actors."""
        return self.plans[member.node.node_id].threads_without_crf(member.node.cpus)

    def capacity(self, batch_size: int) -> int:
        """Cores in flight that keep every actor busy with one more batch queued: bounded object-store use."""
        return 2 * (len(self.of_kind("model")) * batch_size + len(self.of_kind("crf")))

    def peak_rss(self) -> dict[str, list[float]]:
        memory: dict[str, list[float]] = {}
        for kind in ("model", "crf"):
            members = self.of_kind(kind)
            try:
                memory[kind] = self.ray.get([m.handle.peak_rss_mb.remote() for m in members], timeout=30)
            except Exception:  # a report field: a node lost at the very end must not fail the run
                memory[kind] = []
        return memory

    def model_runtimes(self) -> list[str]:
        """The runtimes the model actors' forward passes run on (``ModelWorker.runtime_name``)."""
        try:
            names = self.ray.get([m.handle.runtime_name.remote() for m in self.of_kind("model")], timeout=30)
        except Exception:  # a report field, as peak_rss
            return []
        return sorted(set(names))

    def close(self, leave_warm: bool = True) -> None:
        """Stop the actors, except warm ones when ``leave_warm``: those stay for the next run, each until
        it has been idle for its limit (``keep_warm_s`` when these pools set one)."""
        for member in self.members:
            with suppress(Exception):  # already gone
                if not (member.warm and leave_warm):
                    self.ray.kill(member.handle, no_restart=True)
                elif self.keep_warm_s:
                    self.ray.get(member.handle.stay_warm.remote(self.keep_warm_s), timeout=30)
        self.members.clear()
