"""How a scene's grid meets a model's: the pixel size or µm/px it is segmented at, and what refuses it.

Each reader checks its own kind of scene here (``SceneReader.check``): rasters by ground pixel size (warned,
or resampled with --match-resolution), their georeferencing and sample range; slides by µm/px, read at the
pyramid level nearest the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from models.metadata import CheckpointMetadata
from pipeline.io.slides import level_for_scale, working_scale
from pipeline.io.sources import Scene

# Beyond this ratio between the scene's and the model's pixel size, objects look too small or too large
# for the model (DeepLab is trained at one scale); closer than 1% counts as the same resolution.
PIXEL_SIZE_TOLERANCE = 1.25
SAME_RESOLUTION = 1.01
# Past this factor between the scene's and the model's pixel size a scene is refused (--force-resolution
# segments it anyway) and --match-resolution will not resample it: a model trained at 0.1 m does not see 30 m
# pixels usefully, and the resampled grid would be enormous.
MAX_RESAMPLE = 8.0
# Slides are pyramids read at the model's µm/px; past this the model sees a thumbnail (e.g. an aerial model).
MAX_SLIDE_DOWNSAMPLE = 64.0


@dataclass(frozen=True)
class GridRules:
    """What the user allows of a scene's grid: the options of the same names."""

    allow_ungeoreferenced: bool = False
    match_resolution: bool = False
    force_resolution: bool = False


@dataclass(kw_only=True)
class GridCheck:
    """What a reader found: problems refuse the scene, warnings are reported, ``scale`` is the grid."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scale: float = 1.0  # staged pixels per source pixel along each axis
    mismatches: list[str] = field(default_factory=list)  # problems of the pixel size (or µm/px) alone


def check_raster(scene: Scene, metadata: CheckpointMetadata, rules: GridRules) -> GridCheck:
    """A georeferenced raster at its own pixel size, or resampled to the model's (--match-resolution)."""
    problems: list[str] = []
    mismatches: list[str] = []
    warnings: list[str] = []
    if not scene.georeferenced and not rules.allow_ungeoreferenced:
        problems.append("has no CRS/transform (use --allow-ungeoreferenced to segment it anyway)")
    elif problem := transform_problem(scene):
        problems.append(problem)
    problems += sample_range_problems(scene, metadata)
    if not scene.has_mask and scene.nodata is None:
        warnings.append("declares no nodata value, alpha band or mask: every pixel is segmented")
    scale = 1.0
    scene_size, model_size = scene.pixel_size_m(), metadata.pixel_size_m
    if scene_size and model_size:
        ratio = scene_size / model_size
        factor = max(ratio, 1 / ratio)
        how = "coarser" if ratio > 1 else "finer"
        sizes = f"pixel size {scene_size:.3g} m is {factor:.3g}x {how} than the model's {model_size:.3g} m"
        if rules.match_resolution and factor > MAX_RESAMPLE:
            mismatches.append(
                f"{sizes}: --match-resolution resamples by at most {MAX_RESAMPLE:g}x; "
                "use a model trained nearer it"
            )
        elif rules.match_resolution and factor > SAME_RESOLUTION:
            scale = ratio
            warnings.append(
                f"resampled from {scene_size:.3g} m to the model's {model_size:.3g} m pixels "
                "(--match-resolution)"
            )
        elif factor > MAX_RESAMPLE and not rules.force_resolution:
            mismatches.append(
                f"{sizes}: over {MAX_RESAMPLE:g}x, the model does not see objects at the scale it "
                "learnt them; use a model trained nearer it (--force-resolution segments it anyway)"
            )
        elif not rules.match_resolution and factor > PIXEL_SIZE_TOLERANCE:
            warnings.append(
                f"pixel size {scene_size:.3g} m differs from the model's training pixel size "
                f"{model_size:.3g} m by a factor {ratio:.2f}; results may suffer "
                "(--match-resolution resamples)"
            )
    elif rules.match_resolution:
        missing = "the scene has no ground pixel size" if not scene_size else "the model has no pixel size"
        problems.append(f"--match-resolution needs both pixel sizes, but {missing}")
    elif not model_size:
        warnings.append(
            "the checkpoint records no training pixel size: the scene's resolution could not be checked "
            "against the model's"
        )
    return GridCheck(problems=problems, warnings=warnings, scale=scale, mismatches=mismatches)


def check_slide(scene: Scene, metadata: CheckpointMetadata) -> GridCheck:
    """Slides always work at the model's µm/px: the pyramid level nearest it, the rest resampled."""
    assert scene.slide is not None, "a slide"
    problems: list[str] = []
    mismatches: list[str] = []
    warnings: list[str] = []
    scale = 1.0
    model_mpp = metadata.pixel_size_m * 1e6 if metadata.pixel_size_m else None
    if scene.slide.mpp is None:
        problems.append("no µm/px in the slide's metadata; pass --mpp (the scanner's level-0 µm per pixel)")
    elif model_mpp is None:
        warnings.append("the model has no training µm/px: the slide is segmented at its level 0")
    elif model_mpp / scene.slide.level_mpp(0) > MAX_SLIDE_DOWNSAMPLE:
        mismatches.append(
            f"the model was trained at {model_mpp:.3g} µm/px, over {MAX_SLIDE_DOWNSAMPLE:g}x coarser than "
            f"the slide's {scene.slide.level_mpp(0):.3g} µm/px: not a model for slides"
        )
    else:
        scale = working_scale(scene.slide, model_mpp)
        if 1 / scale > SAME_RESOLUTION:
            level, _ = level_for_scale(scene.slide, scale)
            warnings.append(
                f"segmented at the model's {model_mpp:.3g} µm/px (level {level}, "
                f"{scene.slide.level_mpp(0):.3g} µm/px at level 0)"
            )
        elif scene.slide.level_mpp(0) > model_mpp * PIXEL_SIZE_TOLERANCE:
            warnings.append(
                f"level 0 is {scene.slide.level_mpp(0):.3g} µm/px, coarser than the model's {model_mpp:.3g}: "
                "results may suffer"
            )
    return GridCheck(problems=problems, warnings=warnings, scale=scale, mismatches=mismatches)


def transform_problem(scene: Scene) -> str | None:
    """A geotransform no output can be published on: a coefficient not finite, or pixels of no area (a pixel
    size of 0): refused before the work, not after it at publishing."""
    coefficients = tuple(scene.transform)[:6]
    if not all(math.isfinite(value) for value in coefficients):
        listed = ", ".join(f"{value:g}" for value in coefficients)
        return f"has a geotransform that is not finite ({listed}): fix its georeferencing"
    if scene.transform.determinant == 0:
        return "has pixels of no area (a pixel size of 0 in its geotransform): fix its georeferencing"
    return None


def sample_range_problems(scene: Scene, metadata: CheckpointMetadata) -> list[str]:
    """The model's normalisation assumes the value range it was trained on (e.g. 0-255 for 8-bit imagery)."""
    full_scale = scene.full_scale
    if full_scale is None:
        return []  # float imagery: taken to be on the model's scale; its range is unknown before reading
    if math.isclose(full_scale, metadata.input_max):
        return []
    signed = np.dtype(scene.dtype).kind == "i"  # two's complement: as far below zero as above, plus one
    held = (
        f"{scene.dtype} samples ({-(full_scale + 1):g} to {full_scale:g})"
        if signed
        else f"{scene.bits}-bit {scene.dtype} samples (0-{full_scale:g})"
    )
    return [
        f"has {held} but the model was trained on "
        f"{metadata.input_dtype} input (0-{metadata.input_max:g}); convert or rescale the scene first"
    ]
