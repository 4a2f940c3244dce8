"""A scene's records through the stages, one type per step, each built by keyword and never changed by a later
stage: planned (preflighted, keyed), staged (stores, ledger, cores still to do), computed (what ran)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.checkpoint import CheckpointInfo
from pipeline.engine.grid import PLAN_VERSION, PendingCore, count_windows
from pipeline.engine.ledger import Ledger, result_key
from pipeline.engine.manifest import SceneKey
from pipeline.engine.plan import ScenePlan
from pipeline.engine.stage import StagedStores
from pipeline.io.sources import Scene, Source


@dataclass(frozen=True, kw_only=True)
class PlannedScene:
    """A scene that passed its preflight: what it is, its plan, its result key, and its last published result
    when that has the same key (the scene is then skipped)."""

    source: Source
    scene: Scene
    checkpoint: CheckpointInfo
    plan: ScenePlan
    input_identity: (
        str  # the input's sha256, or a remote object's ETag and size (``sources.source_identity``)
    )
    key: SceneKey
    seconds: float  # the preflight's

    @property
    def name(self) -> str:
        return self.scene.scene_id

    @property
    def ledger_key(self) -> str:
        """What makes a core's result: every input of its computation. A change to any starts the ledger
        over."""
        plan = self.plan
        return result_key(
            input=self.input_identity,
            checkpoint=self.checkpoint.sha256,
            tile=plan.tiling.tile,
            halo=plan.halo,
            cores_per_window=plan.tiling.cores_per_window,
            crf=plan.crf_key(),
            scales=plan.multiscale.scales,
            fuse=plan.multiscale.fuse,
            tta=plan.tta,
            scale=plan.check.scale,
            plan=PLAN_VERSION,
            context=plan.scene_context,
        )


@dataclass(frozen=True, kw_only=True)
class StagedScene:
    """A planned scene staged into zarr, with its ledger and the cores still to compute."""

    planned: PlannedScene
    stores: StagedStores
    ledger: Ledger
    todo: list[PendingCore]
    nodata_cores: int  # wholly nodata: never computed
    resumed: int  # cores a previous run recorded
    seconds: float  # the staging's

    @property
    def name(self) -> str:
        return self.planned.name

    @property
    def windows(self) -> int:
        """Windows the cores still to compute need (a block's cores share one)."""
        return count_windows([tile for tile, _ in self.todo])


@dataclass(frozen=True, kw_only=True)
class ComputeRun:
    """What a compute backend did for one scene, for its report."""

    cores: int = 0  # computed this run
    runtimes: list[str] = field(default_factory=list)  # what the model's forward passes ran on
    actor_memory: dict[str, list[float]] = field(default_factory=dict)  # peak RSS (MB) by kind of worker
    cluster: dict[str, object] | None = None  # the cluster section of the report, from a cluster backend


@dataclass(frozen=True, kw_only=True)
class ComputedScene:
    """A staged scene whose every valid core is in its ledger."""

    staged: StagedScene
    run: ComputeRun
    seconds: float  # the compute stage's

    @property
    def name(self) -> str:
        return self.staged.name
