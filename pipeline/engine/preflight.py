"""Check a scene against a checkpoint before any work: problems refuse the scene, warnings are printed.

Every line names the file, so a nightly batch log says which scene has which problem. The band count is
checked here for every kind of scene; the grid (pixel size, µm/px, georeferencing) by the scene's reader.
Integer samples are checked by their bit depth; float samples, whose range no header states, by a small
sample of valid pixels against the checkpoint's band statistics (0-1 reflectance given to a 0-255 model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from deeplab_common.errors import ResolutionMismatch, SceneRefused
from models.metadata import CheckpointMetadata
from pipeline.io.readers import open_blocks, reader_of
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
    if np.dtype(scene.dtype).kind == "f" and not problems and not grid.problems:
        problems += float_scale_problems(scene, metadata)
    return PreflightResult(
        scene=scene,
        problems=problems + grid.problems,
        warnings=grid.warnings,
        scale=grid.scale,
        mismatches=grid.mismatches,
    )


SAMPLE_GRID = 3  # blocks a side, spread over the scene
SAMPLE_BLOCK = 64  # pixels a side
SCALE_RATIO_LIMIT = 20.0  # the sample's magnitude this many times off the model's: another scale


def float_scale_problems(scene: Scene, metadata: CheckpointMetadata) -> list[str]:
    """A float scene whose sampled values sit on another scale than the model's training imagery: per band,
    the sample's mean magnitude plus spread against the band statistics', off by over ``SCALE_RATIO_LIMIT``
    on the median band. Reads ``SAMPLE_GRID``² small blocks, NaN and nodata left out."""
    samples: list[np.ndarray] = []
    with open_blocks(scene, 1.0) as blocks:
        for row in range(SAMPLE_GRID):
            for column in range(SAMPLE_GRID):
                height, width = min(SAMPLE_BLOCK, scene.height), min(SAMPLE_BLOCK, scene.width)
                top = (scene.height - height) * row // max(SAMPLE_GRID - 1, 1)
                left = (scene.width - width) * column // max(SAMPLE_GRID - 1, 1)
                pixels = blocks.read_block(top, left, height, width).astype(np.float64)
                valid = blocks.read_valid(top, left, height, width) & np.isfinite(pixels).all(axis=0)
                samples.append(pixels[:, valid])
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:
        return []  # nothing valid to judge by: the all-nodata case is said elsewhere
    ratios = [
        (abs(float(band.mean())) + float(band.std())) / (abs(info.mean) + info.std)
        for band, info in zip(values, metadata.bands, strict=True)
    ]
    ratio = float(np.median(ratios))
    if 1 / SCALE_RATIO_LIMIT <= ratio <= SCALE_RATIO_LIMIT:
        return []
    low, high = float(values.min()), float(values.max())
    return [
        f"has {scene.dtype} samples of {low:.3g} to {high:.3g} (sampled), {ratio:.3g}x the scale of the "
        f"model's training imagery ({metadata.input_dtype}, 0-{metadata.input_max:g}): rescale the scene "
        "first"
    ]
