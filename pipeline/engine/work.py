"""A scene on its way through the stages: prepared (preflighted and planned), then staged with its ledger
and the cores still to compute."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.checkpoint import CheckpointInfo
from pipeline.engine.grid import count_windows
from pipeline.engine.ledger import Ledger
from pipeline.engine.plan import ScenePlan
from pipeline.engine.stage import StagedScene
from pipeline.engine.workers import Work
from pipeline.io.sources import Scene, Source
from pipeline.ray.session import RunStats


@dataclass
class PreparedScene:
    """A scene that passed its preflight: what it is, what runs on it and the input's checksum."""

    source: Source
    scene: Scene
    checkpoint: CheckpointInfo
    plan: ScenePlan
    checksum: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.scene.scene_id


@dataclass
class StagedWork:
    """A staged scene, its ledger and the cores still to compute."""

    prepared: PreparedScene
    staged: StagedScene
    ledger: Ledger
    todo: list[Work]
    skipped: int  # wholly nodata cores, never computed
    resumed: int  # cores a previous run recorded
    computed: int = 0
    runtimes: list[str] = field(default_factory=list)  # what the model's forward passes ran on this run

    @property
    def windows(self) -> int:
        """Windows the cores still to compute need (a block's cores share one)."""
        return count_windows([tile for tile, _ in self.todo])

    cluster: RunStats | None = None  # set by the Ray engine
