"""A scene's plan before any work: preflight, the grid it runs on, its tiling, halo, cores, CRF, views and
scales resolved from the options and the checkpoint (``--dry-run`` prints it); and how a run reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from models.metadata import TTA_PHRASES, CheckpointMetadata, CRFParams, InputScales, Tiling
from pipeline.crf import CPU_DEFAULT
from pipeline.engine.grid import (
    Tile,
    count_windows,
    has_image_pooling,
    model_halo,
    plan_tiles,
    resolve_tiling,
    window_warning,
)
from pipeline.engine.options import SegmentOptions, neutral_value
from pipeline.engine.preflight import PreflightResult, preflight
from pipeline.engine.space import check_fits
from pipeline.io.readers import open_blocks, reader_of
from pipeline.io.sources import Scene, resampled_shape

CoreDone = Callable[[], None]  # progress callback, once per finished core


class Progress(Protocol):
    """Where a run reports its stages and finished cores (the CLI draws them; tests may record them)."""

    def stage(self, scene: str, stage: str, detail: str = "") -> None: ...

    def cores(self, scene: str, total: int) -> CoreDone: ...


class Silent:
    def stage(self, scene: str, stage: str, detail: str = "") -> None:
        return None

    def cores(self, scene: str, total: int) -> CoreDone:
        return lambda: None


@dataclass(frozen=True, kw_only=True)
class ScenePlan:
    """What a run will do for one scene, before any of it is done (``--dry-run`` prints this)."""

    check: PreflightResult
    shape: tuple[int, int]  # the grid the model runs on (the source's unless --match-resolution)
    tiling: Tiling  # the options' tile and block, else the checkpoint's
    halo: int
    tiles: list[Tile]
    crf: CRFParams | None
    tta: str  # the options' test-time views, else the checkpoint's, else none
    multiscale: InputScales  # the options' input scales and fusion, else the checkpoint's, else 1 alone
    crf_backend: str | None  # None when the CRF is off
    crf_reason: str  # why the CRF is on or off: the options, else the checkpoint's verdict
    scene_context: bool  # --context scene, on a model with image pooling (else it changes nothing)

    def crf_key(self) -> dict[str, Any] | None:
        """The CRF's part of the ledger key: its parameters, and its backend where not pydensecrf (the one
        every core was computed with before there was a choice: their keys stay valid)."""
        if self.crf is None:
            return None
        backend = {} if self.crf_backend == neutral_value("crf_backend") else {"backend": self.crf_backend}
        return self.crf.model_dump() | backend

    @property
    def window(self) -> int:
        return max(t.window[2] for t in self.tiles) if self.tiles else 0

    @property
    def windows(self) -> int:
        return count_windows(self.tiles)

    def describe(self, nodata_cores: int | None = None) -> list[str]:
        scene = self.check.scene
        where = reader_of(scene).where(scene)
        lines = [
            f"{scene.path}: {scene.height}x{scene.width} px, {scene.bands} band(s) {scene.dtype}, {where}"
        ]
        if self.shape != (scene.height, scene.width):
            lines.append(f"  resampled to {self.shape[0]}x{self.shape[1]} px (x{self.check.scale:.3g})")
        cores = (
            f"{len(self.tiles)} cores of {self.tiling.tile} px in blocks of {self.tiling.cores_per_window}²"
        )
        if nodata_cores is not None:
            cores += f" ({nodata_cores} wholly nodata, skipped)"
        lines.append(f"  {cores}, halo {self.halo} px, {self.windows} windows of up to {self.window} px")
        if not self.multiscale.single:
            lines.append(f"  multi-scale inputs: {self.multiscale.describe()}")
        if self.tta != "none":
            lines.append(f"  test-time views ({self.tta}): logits averaged over {TTA_PHRASES[self.tta]}")
        crf = f"{self.crf.model_dump()}, {self.crf_backend} backend" if self.crf else "off"
        lines.append(f"  CRF: {crf} ({self.crf_reason})")
        lines += [f"  warning: {w}" for w in self.check.warnings]
        return lines


def plan_scene(
    scene: Scene, metadata: CheckpointMetadata, options: SegmentOptions, out_dir: Path | None = None
) -> ScenePlan:
    """Preflight (raises on problems) and the tile plan; reads no pixels. With ``out_dir``, a scene that
    cannot fit the free space there is refused too."""
    check = preflight(
        scene, metadata, options.allow_ungeoreferenced, options.match_resolution, options.force_resolution
    )
    shape = resampled_shape(scene.height, scene.width, check.scale)
    if options.max_pixels is not None and shape[0] * shape[1] > options.max_pixels:
        check.problems.append(
            f"has {shape[1]}x{shape[0]} = {shape[0] * shape[1]} pixels, "
            f"over --max-pixels {options.max_pixels}"
        )
    check.raise_if_refused()
    if out_dir is not None:  # before tiling: a claimed 10^10-pixel grid is refused, not tiled
        check_fits(scene.path, shape, scene.bands, scene.dtype, out_dir, options.probabilities)
    use_crf, crf_reason = crf_choice(options, metadata)
    crf = (options.crf_params or metadata.crf) if use_crf else None
    tiling = resolve_tiling(metadata, options.tile, options.cores_per_window)
    multiscale = metadata.multiscale(options.scales, options.fuse)
    scene_context = options.context == "scene" and has_image_pooling(metadata)  # else it changes nothing
    halo = options.halo
    if halo is None:
        halo = model_halo(
            metadata, crf.sigma_alpha if crf else None, tiling.tile, scene_context, min(multiscale.scales)
        )
    plan = ScenePlan(
        check=check,
        shape=shape,
        tiling=tiling,
        halo=halo,
        tiles=plan_tiles(shape[0], shape[1], tiling.tile, halo, tiling.cores_per_window),
        crf=crf,
        tta=metadata.views(options.tta),
        multiscale=multiscale,
        crf_backend=crf_backend(options) if crf else None,
        crf_reason=crf_reason,
        scene_context=scene_context,
    )
    if options.tile is None and (warning := window_warning(metadata, plan.window, options.context)):
        check.warnings.append(warning)
    return plan


def crf_choice(options: SegmentOptions, metadata: CheckpointMetadata) -> tuple[bool, str]:
    """Whether the CRF runs, and why: ``--crf``/``--no-crf``, else the checkpoint's advice."""
    if options.crf is not None:
        return (
            options.crf,
            f"{'on' if options.crf else 'off'} as asked ({'--crf' if options.crf else '--no-crf'})",
        )
    return metadata.crf_advice()


def crf_backend(options: SegmentOptions) -> str:
    """The CRF implementation a run uses: the one asked for, else torch on the GPU, else the CPU default."""
    if options.crf_backend is not None:
        return options.crf_backend  # never pydensecrf with --crf-device gpu: the options refuse that
    return "torch" if options.crf_device == "gpu" else CPU_DEFAULT


def as_planned(options: SegmentOptions, plan: ScenePlan) -> SegmentOptions:
    """``options`` with what ``plan`` resolved from the checkpoint filled in (the input scales and fusion),
    as the manifest hashes them: an unset option and the value it stands for give one key, and keys from
    before these options could be unset stay valid."""
    return options.model_copy(
        update={
            "scales": plan.multiscale.scales,
            "fuse": plan.multiscale.fuse,
            "crf": plan.crf is not None,
            "crf_backend": plan.crf_backend,
        }
    )


def count_nodata_cores(scene: Scene, plan: ScenePlan) -> int:
    """Cores without one valid pixel, read from the source's mask (what a dry run can know unstaged)."""
    with open_blocks(scene, plan.check.scale) as blocks:
        return sum(
            not blocks.read_valid(t.core_top, t.core_left, t.core_height, t.core_width).any()
            for t in plan.tiles
        )
