"""The tile grid: non-overlapping cores that cover the scene, each read with a halo of context."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np

from models.metadata import CheckpointMetadata, Tiling


class _Indexable(Protocol):
    def __getitem__(self, key: Any) -> Any: ...


# a NumPy array or a torch tensor (the model actor cuts its device tensors with the same functions)
Sliceable = TypeVar("Sliceable", bound=_Indexable)


@dataclass(frozen=True)
class Tile:
    """A core (the pixels this tile writes) inside a window (the pixels the model sees), scene coordinates."""

    row: int
    col: int
    core_top: int
    core_left: int
    core_height: int
    core_width: int
    halo: int
    scene_height: int
    scene_width: int
    # (top, left, height, width) of the block of cores that shares this core's window (--cores-per-window):
    # one window per block, so the halo is read and computed once per block instead of once per core.
    # None: the core alone.
    block: tuple[int, int, int, int] | None = None

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the core's block + halo, clipped to the scene.

        Clipped, not padded: at a scene edge the model sees the real edge, as whole-image inference does,
        instead of reflected pixels that no whole-image pass would see (and edge windows cost less).
        """
        top, left, height, width = self.block or (
            self.core_top,
            self.core_left,
            self.core_height,
            self.core_width,
        )
        bottom = min(top + height + self.halo, self.scene_height)
        right = min(left + width + self.halo, self.scene_width)
        top, left = max(top - self.halo, 0), max(left - self.halo, 0)
        return top, left, bottom - top, right - left


# A core to compute and its valid-pixel mask; None when every pixel is valid, so that the driver's list of
# cores stays small whatever the scene size (only cores on a nodata edge carry a mask).
PendingCore = tuple[Tile, np.ndarray | None]


# Part of every ledger key: a change to how windows are cut changes results, so old ledgers are not reused.
PLAN_VERSION = "clipped-windows, crf-reach, blocks"

# The engine's tiling for a checkpoint that records none: 512 px cores in 2x2 blocks (1024 px + halo windows).
DEFAULT_TILING = Tiling(tile=512, cores_per_window=2)


def resolve_tiling(
    metadata: CheckpointMetadata, tile: int | None = None, cores_per_window: int | None = None
) -> Tiling:
    """What is asked, else what the checkpoint records (its evaluated tiling), else ``DEFAULT_TILING``."""
    recorded = metadata.tiling or DEFAULT_TILING
    return Tiling(
        tile=tile if tile is not None else recorded.tile,
        cores_per_window=cores_per_window if cores_per_window is not None else recorded.cores_per_window,
    )


HALO_ALIGN = 32  # a multiple of every output stride: tiles sample the feature grid in phase with the scene


def default_halo(
    receptive_radius: int, crf_sigma_alpha: float | None, tile: int, global_context: bool = True
) -> int:
    """Context around each core: the model's receptive field and 3 σα of the CRF's appearance kernel.

    Capped, since deep backbones' theoretical fields (500-900 px) exceed the context that sways a prediction.
    Models with image pooling (DeepLab-v3) depend on the whole window anyway: half a core (a window of two
    cores a side); measured on the Kampala scene, border excess against a half-core-shifted tiling 0.93 points
    at 64 px, 0.48 at 256 px. Models without (v2 ASPP, LargeFOV) can tile exactly: up to a whole core; a
    trained v2 ASPP on EfficientNet-Lite0 agreed with whole-image output on 98.2% of a Kampala crop at 256 px,
    99.7% at 384, 99.99% at 512 (bench/seams.py).
    """
    crf_context = crf_reach(crf_sigma_alpha) if crf_sigma_alpha else 0
    needed = -(-max(receptive_radius, crf_context) // HALO_ALIGN) * HALO_ALIGN
    cap = (tile // 2 if global_context else tile) // HALO_ALIGN * HALO_ALIGN
    return max(HALO_ALIGN, min(needed, cap))


def crf_reach(*sigmas: float) -> int:
    """Pixels around a core that the CRF's Gaussian kernels still draw on: 3 σ of the widest (1% weight)."""
    return math.ceil(3 * max(sigmas))


def model_halo(
    metadata: CheckpointMetadata,
    crf_sigma_alpha: float | None,
    tile: int,
    scene_context: bool = False,
    min_scale: float = 1.0,
) -> int:
    """``default_halo`` for a checkpoint's architecture (the one place that asks for its receptive field).

    ``scene_context``: the image pooling gets the scene's vector (``--context scene``), so the windows no
    longer change it and the model tiles like one without global context. ``min_scale``: the smallest
    multi-scale input; shrunk by it, each window pixel spans 1/scale scene pixels, and so does the field."""
    # here, not at the top: it builds the model (torch), and the CRF actors import this module
    from models.receptive_field import receptive_radius

    arch_args = tuple(sorted(metadata.arch_args.items()))
    radius = math.ceil(receptive_radius(metadata.architecture, arch_args) / min(1.0, min_scale))
    global_context = has_image_pooling(metadata) and not scene_context
    return default_halo(radius, crf_sigma_alpha, tile, global_context)


def window_warning(metadata: CheckpointMetadata, window: int, context: str) -> str | None:
    """A warning when a model whose image pooling sees each window gets windows far larger than its training
    crops and its checkpoint records no evaluated tiling (the Lite2 Kampala model lost 0.18 IoU so)."""
    crop = metadata.training.get("config", {}).get("crop_size")
    if not crop or metadata.tiling is not None or context == "scene" or not has_image_pooling(metadata):
        return None
    if window <= 3 * crop:
        return None
    return (
        f"windows of up to {window} px are {window / crop:.1f}x the {crop} px crops the model was trained "
        "on, and its image pooling averages each whole window: `deeplab tune-tiling` stores a tiling "
        "measured on validation images (or pass --tile)"
    )


def has_image_pooling(metadata: CheckpointMetadata) -> bool:
    """Whether the checkpoint's architecture pools the whole window (DeepLab-v3's image-level branch)."""
    from models.registry import get_architecture

    return get_architecture(metadata.architecture).global_context


def plan_tiles(height: int, width: int, tile: int, halo: int, cores_per_window: int = 1) -> list[Tile]:
    """Cores of ``tile`` px in scan order; blocks of ``cores_per_window`` x ``cores_per_window`` cores share
    one window. A 512 px core with a 256 px halo alone reads 4x its pixels; a block of 2x2 of them 2.25x."""
    if tile < 16 or halo < 0 or cores_per_window < 1:
        raise ValueError(
            "tile must be >= 16, halo >= 0 and cores per window >= 1 "
            f"(got {tile}, {halo}, {cores_per_window})"
        )
    span = tile * cores_per_window

    def block_of(top: int, left: int) -> tuple[int, int, int, int] | None:
        if cores_per_window == 1:
            return None
        block_top, block_left = top // span * span, left // span * span
        return block_top, block_left, min(span, height - block_top), min(span, width - block_left)

    return [
        Tile(
            r,
            c,
            top,
            left,
            min(tile, height - top),
            min(tile, width - left),
            halo,
            height,
            width,
            block_of(top, left),
        )
        for r, top in enumerate(range(0, height, tile))
        for c, left in enumerate(range(0, width, tile))
    ]


def count_windows(tiles: list[Tile]) -> int:
    """Distinct windows among ``tiles`` (a block's cores share one)."""
    return len({t.window for t in tiles})


def fit_blocks(tiles: list[Tile]) -> list[Tile]:
    """Each block cut down to the cores of ``tiles`` in it (those with a valid pixel): a block with one valid
    core reads that core's window, not the whole block's (nodata collars, slides' background). It depends
    only on which cores have valid pixels, so a resumed run computes the same windows."""
    extents: dict[tuple[int, int, int, int], list[int]] = {}
    for t in tiles:
        if t.block is not None:
            top, left, bottom, right = extents.setdefault(t.block, [t.core_top, t.core_left, 0, 0])
            extents[t.block] = [
                min(top, t.core_top),
                min(left, t.core_left),
                max(bottom, t.core_top + t.core_height),
                max(right, t.core_left + t.core_width),
            ]
    fitted = {block: (e[0], e[1], e[2] - e[0], e[3] - e[1]) for block, e in extents.items()}
    return [replace(t, block=fitted[t.block]) if t.block is not None else t for t in tiles]


def read_window(source: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's window from a (bands, H, W) array (zarr or numpy)."""
    top, left, height, width = tile.window
    return np.asarray(source[..., top : top + height, left : left + width])


def narrowed(tile: Tile, halo: int) -> Tile:
    """The core alone with at most ``halo`` of context (the CRF needs less than the model)."""
    return replace(tile, halo=min(halo, tile.halo), block=None)


def crop_window(window_array: Sliceable, tile: Tile, inner: Tile) -> Sliceable:
    """Crop an array the size of ``tile``'s window (…, H, W) to the window of ``inner`` (same core)."""
    top, left = tile.window[:2]
    inner_top, inner_left, height, width = inner.window
    rows, cols = inner_top - top, inner_left - left
    return window_array[..., rows : rows + height, cols : cols + width]


def core_of(window_array: Sliceable, tile: Tile) -> Sliceable:
    """Crop a window-sized array (…, H, W) back to the tile's core."""
    top, left = tile.window[:2]
    rows = tile.core_top - top
    cols = tile.core_left - left
    return window_array[..., rows : rows + tile.core_height, cols : cols + tile.core_width]


def cores_to_compute(
    tiles: list[Tile], valid_store: Any, is_done: Callable[[int, int], bool] | None = None
) -> tuple[list[PendingCore], int]:
    """The cores still to compute (with a valid mask where partly nodata), and how many are wholly nodata.
    Blocks of cores are fitted to the cores with valid pixels (``fit_blocks``).

    Without ``is_done``: every core with a valid pixel."""
    cores: list[Tile] = []
    masks: list[np.ndarray | None] = []
    for tile in tiles:
        core_valid = np.asarray(
            valid_store[
                tile.core_top : tile.core_top + tile.core_height,
                tile.core_left : tile.core_left + tile.core_width,
            ]
        )
        if core_valid.any():  # else left nodata, never computed
            cores.append(tile)
            masks.append(None if core_valid.all() else core_valid)
    todo = [
        (tile, mask)
        for tile, mask in zip(fit_blocks(cores), masks, strict=True)
        if is_done is None or not is_done(tile.row, tile.col)
    ]
    return todo, len(tiles) - len(cores)
