"""`deeplab tune-tiling`: the core size the engine cuts scenes into for a model, chosen on validation images.

DeepLab-v3/v3+ average features over the whole window in their image-pooling branch. Trained on crops of a
few hundred pixels, they can lose accuracy on much larger windows (measured: landcover-dubai on its
held-out tile, 0.506 mIoU on whole 2000 px images, 0.546 on 384 px windows). Each candidate runs the model
on the engine's windows over the images, without the CRF; whole images are scored alongside for reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from models.checkpoint import LoadedModel
from models.data import Pair
from models.metadata import Tiling
from pipeline.evaluate import evaluate


@dataclass(frozen=True)
class TilingTrial:
    tiling: Tiling | None  # None: whole images
    miou: float
    boundary_f1: float

    def describe(self) -> str:
        return "whole images" if self.tiling is None else self.tiling.describe()


def tune_tiling(
    loaded: LoadedModel,
    pairs: list[Pair],
    tiles: Iterable[int],
    cores_per_window: int,
    exclude_classes: list[str] | None = None,
    on_trial: Callable[[TilingTrial], None] | None = None,
) -> dict[str, Any]:
    """Score every candidate core size (mIoU without CRF, ties to the larger core: fewer windows) and
    return ``{"best": tiling, "trials": [...], "whole_image": ...}``."""
    trials: list[TilingTrial] = []
    candidates: list[Tiling | None] = [None]
    candidates += [Tiling(tile=tile, cores_per_window=cores_per_window) for tile in sorted(set(tiles))]
    for tiling in candidates:
        report = evaluate(loaded, pairs, with_crf=False, exclude_classes=exclude_classes, tiling=tiling)
        trial = TilingTrial(tiling, report["no_crf"]["miou"], report["no_crf"]["boundary_f1"])
        trials.append(trial)
        if on_trial:
            on_trial(trial)
    tiled = [(t.tiling, t.miou) for t in trials if t.tiling is not None]
    if not tiled:
        raise ValueError("tune_tiling needs at least one core size")
    best, best_miou = max(tiled, key=lambda pair: (round(pair[1], 4), pair[0].tile))
    return {
        "best": best.model_dump(),
        "best_miou": best_miou,
        "whole_image": {"miou": trials[0].miou, "boundary_f1": trials[0].boundary_f1},
        "trials": [
            {
                "tiling": t.tiling.model_dump() if t.tiling else "whole image",
                "miou": t.miou,
                "boundary_f1": t.boundary_f1,
            }
            for t in trials
        ],
        "images": len(pairs),
    }
