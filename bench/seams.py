"""Seams: does tiling change predictions? Tiled output against whole-image output and a shifted tiling.

Uses the engine's own pieces (tile plan, windows clipped to the scene, the model worker, core cropping), so
what is measured is what `deeplab segment` does. Run: python -m bench.seams (writes bench/reports/seams.*).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from torch import nn

from deeplab_common.atomic import write_text_atomically
from models.checkpoint import LoadedModel
from models.inference import normalise
from models.metadata import CheckpointMetadata
from models.registry import build_model
from pipeline.engine.grid import (
    DEFAULT_TILING,
    Tile,
    core_of,
    cores_to_compute,
    model_halo,
    plan_tiles,
)
from pipeline.engine.workers import (
    ModelWorker,
    context_of,
    local_context_sums,
    read_windows,
    window_batches,
)

ENGINE_CORES_PER_WINDOW = DEFAULT_TILING.cores_per_window  # the engine's default plan
BORDER = 16  # px each side of a core border counted as "near a border"


def predict_tiled(
    worker: ModelWorker,
    image: np.ndarray,
    tile: int,
    halo: int,
    shift: int = 0,
    batch: int = 2,
    context: np.ndarray | None = None,
    cores_per_window: int = ENGINE_CORES_PER_WINDOW,
) -> np.ndarray:
    """Labels of a (bands, H, W) scene tiled with cores of ``tile`` px, the grid moved by ``shift`` px,
    windows shared by blocks of cores as the engine plans them.

    ``context``: the scene's pooled features for DeepLab-v3's image pooling (``--context scene``)."""
    height, width = image.shape[-2:]
    planned = plan_tiles(height + shift, width + shift, tile, halo, cores_per_window)
    tiles = [_shifted(t, shift, height, width) for t in planned]
    todo = [(t, None) for t in tiles if t.core_height > 0 and t.core_width > 0]
    labels = np.full((height, width), 255, np.uint8)
    for group in window_batches(todo, batch):
        results = worker.predict(read_windows(image, group), (1.0,), "max", False, context=context)
        for members, result in zip(group, results, strict=True):
            for t, _ in members:
                labels[t.core_top : t.core_top + t.core_height, t.core_left : t.core_left + t.core_width] = (
                    core_of(result, t)[0]
                )
    return labels


def predict_whole(worker: ModelWorker, image: np.ndarray) -> np.ndarray:
    """One window over the whole scene (windows stop at the scene's edges, so no halo is added)."""
    height, width = image.shape[-2:]
    return predict_tiled(worker, image, max(height, width), 0, batch=1)


def scene_context(
    worker: ModelWorker, image: np.ndarray, valid: np.ndarray, tile: int, halo: int
) -> np.ndarray:
    """The pooled features ``--context scene`` gives every window: the engine's own pass over the cores."""
    tiles = plan_tiles(image.shape[-2], image.shape[-1], tile, halo, ENGINE_CORES_PER_WINDOW)
    every_core, _ = cores_to_compute(tiles, valid)
    return context_of(local_context_sums(worker, image, every_core, 2))


def _shifted(tile: Tile, shift: int, height: int, width: int) -> Tile:
    """A tile of a grid planned on a (H + shift, W + shift) canvas, moved back by ``shift``, clipped (its
    block too)."""

    def moved(top: int, left: int, rows: int, cols: int) -> tuple[int, int, int, int]:
        bottom, right = top + rows - shift, left + cols - shift
        top, left = max(top - shift, 0), max(left - shift, 0)
        return top, left, bottom - top, right - left

    core = moved(tile.core_top, tile.core_left, tile.core_height, tile.core_width)
    block = moved(*tile.block) if tile.block else None
    return Tile(tile.row, tile.col, *core, tile.halo, height, width, block)


def border_mask(height: int, width: int, tile: int, shift: int = 0) -> np.ndarray:
    """True within BORDER px of an inner core border of a grid with the given shift."""
    near = np.zeros((height, width), bool)
    for edge in range(tile - shift, max(height, width), tile):
        if 0 < edge < height:
            near[max(edge - BORDER, 0) : edge + BORDER] = True
        if 0 < edge < width:
            near[:, max(edge - BORDER, 0) : edge + BORDER] = True
    return near


@dataclass(frozen=True)
class SeamFigures:
    agreement: float  # share of valid pixels where tiled == reference
    border_disagreement: float  # share of valid pixels near core borders that differ
    interior_disagreement: float  # share of valid pixels in core interiors that differ

    @property
    def excess_at_borders(self) -> float:
        return self.border_disagreement - self.interior_disagreement


def compare(tiled: np.ndarray, reference: np.ndarray, valid: np.ndarray, tile: int) -> SeamFigures:
    differ = tiled != reference
    near = border_mask(tiled.shape[0], tiled.shape[1], tile)
    return SeamFigures(
        agreement=float(1 - differ[valid].mean()),
        border_disagreement=float(differ[valid & near].mean()),
        interior_disagreement=float(differ[valid & ~near].mean()),
    )


def worker_for(loaded: LoadedModel, threads: int | None = None) -> ModelWorker:
    return ModelWorker(str(loaded.path), device="cpu", threads=threads, amp=False, loaded=loaded)


class Centred(nn.Module):
    """A model whose class logits are shifted so that each class wins somewhere on a given scene.

    A randomly initialised network's argmax is one class almost everywhere (one logit's bias dominates), so
    its seams would be invisible; subtracting each class's mean logit exposes how every prediction depends
    on the context the window shows, which is what tiling can break.
    """

    def __init__(self, model: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("offset", offset.reshape(1, -1, 1, 1))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch) - self.offset


def random_subject(
    architecture: str, metadata: CheckpointMetadata, image: np.ndarray, valid: np.ndarray, seed: int = 0
) -> LoadedModel:
    """A seeded, randomly initialised ``architecture`` centred on a thumbnail of ``image``."""
    torch.manual_seed(seed)
    model = build_model(architecture, metadata.num_classes, metadata.num_bands, pretrained="none").eval()
    step = max(1, max(image.shape[-2:]) // 512)
    thumbnail = normalise(np.ascontiguousarray(image[:, ::step, ::step]), metadata.bands)[None]
    with torch.no_grad():
        logits = model(thumbnail)[0]
    keep = torch.from_numpy(np.ascontiguousarray(valid[::step, ::step]))
    offset = logits[:, keep].mean(1)
    arch_args = {"num_classes": metadata.num_classes, "in_channels": metadata.num_bands}  # default stride
    subject = metadata.model_copy(update={"architecture": architecture, "arch_args": arch_args})
    return LoadedModel(Centred(model, offset).eval(), subject, Path(f"random-{architecture}"), "random")


def measure(
    loaded: LoadedModel, scene: Path, tile: int = 512, with_scene_context: bool = False
) -> dict[str, Any]:
    """Seam figures of one model on one scene with the engine's default halo (no CRF).

    ``with_scene_context``: as ``--context scene`` (the scene's pooled features for every window, and the
    halo that goes with it)."""
    with rasterio.open(scene) as source:
        image = source.read()
        valid = source.dataset_mask() > 0
    halo = model_halo(loaded.metadata, None, tile, scene_context=with_scene_context)
    worker = worker_for(loaded)
    context = scene_context(worker, image, valid, tile, halo) if with_scene_context else None
    tiled = predict_tiled(worker, image, tile, halo, context=context)
    whole = compare(tiled, predict_whole(worker, image), valid, tile)
    shifted_tiling = predict_tiled(worker, image, tile, halo, shift=tile // 2, context=context)
    shifted = compare(tiled, shifted_tiling, valid, tile)
    return {
        "scene": scene.name,
        "halo": halo,
        "context": "scene" if with_scene_context else "window",
        "against_whole_image": asdict(whole) | {"excess_at_borders": whole.excess_at_borders},
        "against_shifted_tiling": asdict(shifted) | {"excess_at_borders": shifted.excess_at_borders},
    }


def main() -> None:
    from models.checkpoint import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("DEEPLAB_DATA", root.parent / "shared" / "data"))
    scenes = [data / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif", data / "landsat" / "RGB.byte.tif"]
    results: dict[str, Any] = {"border_px": BORDER, "models": {}}
    # the aerial zoo models (the slide model's stain statistics have no meaning on these scenes)
    zoo = (
        "buildings-kampala",
        "buildings-kampala-lite0",
        "buildings-kampala-v2",
        "landcover-dubai",
        "landcover-dubai-lite0",
    )
    for name in zoo:
        loaded = load_checkpoint(root / "models" / "zoo" / f"{name}.safetensors")
        results["models"][f"{name}.safetensors"] = [measure(loaded, scene) for scene in scenes]
        if name == "buildings-kampala-lite0":  # DeepLab-v3+ with --context scene (as tests/test_seams.py)
            runs = [measure(loaded, scene, with_scene_context=True) for scene in scenes]
            results["models"][f"{name}.safetensors, --context scene"] = runs
    metadata = load_checkpoint(root / "models" / "zoo" / "landcover-dubai.safetensors").metadata
    # VGG-16 at output stride 8 costs ~20 CPU-minutes three times over on the Kampala scene: Landsat only.
    for architecture in ("deeplab_largefov_vgg16",):
        runs = []
        for scene in scenes[1:]:
            with rasterio.open(scene) as source:
                subject = random_subject(architecture, metadata, source.read(), source.dataset_mask() > 0)
            runs.append(measure(subject, scene))
        results["models"][f"random-centred {architecture}"] = runs
    reports = root / "bench" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    write_text_atomically(reports / "seams.json", json.dumps(results, indent=2))
    lines = [
        "# Seams",
        "",
        f"Tiled (512 px cores, default halo) against whole-image output and a tiling shifted by half a core; "
        f"'border' = within {BORDER} px of an inner core border. Percent of valid pixels that differ.",
        "",
        "| model | scene | halo | agreement vs whole | border / interior vs whole "
        "| border / interior vs shifted |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results["models"].items():
        for run in runs:
            whole, shifted = run["against_whole_image"], run["against_shifted_tiling"]
            lines.append(
                f"| {name} | {run['scene']} | {run['halo']} | {100 * whole['agreement']:.2f}% | "
                f"{100 * whole['border_disagreement']:.2f} / {100 * whole['interior_disagreement']:.2f} | "
                f"{100 * shifted['border_disagreement']:.2f} / {100 * shifted['interior_disagreement']:.2f} |"
            )
    write_text_atomically(reports / "seams.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
