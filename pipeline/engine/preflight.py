"""Check a scene against a checkpoint before any work: problems refuse the scene, warnings are printed.

Every line names the file, so a nightly batch log says which scene has which problem. The band count is
checked here for every kind of scene; the grid (pixel size, µm/px, georeferencing) by the scene's reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deeplab_common.errors import ResolutionMismatch, SceneRefused
from models.metadata import CheckpointMetadata
from pipeline.io.readers import reader_of
from pipeline.io.resolution import GridRules
from pipeline.io.sources import Scene


@dataclass(frozen=True, kw_only=True)
class PreflightResult:
    scene: Scene
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scale: float = 1.0  # staged pixels per source pixel along each axis (1.0 unless resampled)
    mismatches: list[str] = field(default_factory=list)  # problems of the pixel size (or µm/px) alone

    def raise_if_refused(self) -> None:
        """``ResolutionMismatch`` when the pixel size is the only problem, else ``SceneRefused``: a line per
        problem, each naming the file."""
        lines = [f"{self.scene.path}: {problem}" for problem in self.problems + self.mismatches]
        if lines:
            raise (SceneRefused if self.problems else ResolutionMismatch)(lines)

    def warning_lines(self) -> list[str]:
        return [f"{self.scene.path}: {w}" for w in self.warnings]


def preflight(
    scene: Scene,
    metadata: CheckpointMetadata,
    allow_ungeoreferenced: bool = False,
    match_resolution: bool = False,
    force_resolution: bool = False,
) -> PreflightResult:
    problems: list[str] = []
    if scene.bands != metadata.num_bands:
        problems.append(f"has {scene.bands} band(s) but the model expects {metadata.num_bands}")
    if np.dtype(scene.dtype).kind == "c":
        problems.append(f"has complex ({scene.dtype}) samples: convert them to real values first")
    rules = GridRules(allow_ungeoreferenced, match_resolution, force_resolution)
    grid = reader_of(scene).check(scene, metadata, rules)
    return PreflightResult(
        scene=scene,
        problems=problems + grid.problems,
        warnings=grid.warnings,
        scale=grid.scale,
        mismatches=grid.mismatches,
    )
