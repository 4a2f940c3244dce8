"""`deeplab tune-tiling`: the core size the engine cuts scenes into for a model, chosen on validation images.

DeepLab-v3/v3+ average features over the whole window in their image-pooling branch. Trained on crops of a
few hundred pixels, they can lose accuracy on much larger windows (measured: landcover-dubai on its
held-out tile, 0.506 mIoU on whole 2000 px images, 0.546 on 384 px windows). Each candidate runs the model
on the engine's windows over the images, without the CRF; whole images are scored alongside for reference.
Tilings are compared on single views; candidate test-time views (``--tta``) are then scored on the best
tiling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from models.checkpoint import LoadedModel
from models.data import Pair
from models.inference import tta_views
from models.metadata import TTA_PHRASES, Tiling
from pipeline.evaluate import evaluate


@dataclass(frozen=True)
class TilingTrial:
    tiling: Tiling | None  # None: whole images
    miou: float
    boundary_f1: float
    tta: str = "none"

    def describe(self) -> str:
        where = "whole images" if self.tiling is None else self.tiling.describe()
        return where if self.tta == "none" else f"{where}, {TTA_PHRASES[self.tta]}"

    def record(self) -> dict[str, Any]:
        return {
            "tiling": self.tiling.model_dump() if self.tiling else "whole image",
            "tta": self.tta,
            "miou": self.miou,
            "boundary_f1": self.boundary_f1,
        }


def tune_tiling(
    loaded: LoadedModel,
    pairs: list[Pair],
    tiles: Iterable[int],
    cores_per_window: int,
    exclude_classes: list[str] | None = None,
    on_trial: Callable[[TilingTrial], None] | None = None,
    views: Iterable[str] = (),
) -> dict[str, Any]:
    """Score every candidate core size (mIoU without CRF, ties to the larger core: fewer windows), then each
    of ``views`` (test-time augmentations) on the best one (ties to fewer model passes). Returns
    ``{"best": tiling, "trials": [...], "whole_image": ...}`` and, with ``views``, ``best_tta``."""

    def trial(tiling: Tiling | None, tta: str) -> TilingTrial:
        report = evaluate(loaded, pairs, False, exclude_classes=exclude_classes, tiling=tiling, tta=tta)
        done = TilingTrial(tiling, report["no_crf"]["miou"], report["no_crf"]["boundary_f1"], tta)
        if on_trial:
            on_trial(done)
        return done

    candidates: list[Tiling | None] = [None]
    candidates += [Tiling(tile=tile, cores_per_window=cores_per_window) for tile in sorted(set(tiles))]
    trials = [trial(tiling, "none") for tiling in candidates]
    tiled = [t for t in trials if t.tiling is not None]
    if not tiled:
        raise ValueError("tune_tiling needs at least one core size")
    best = max(tiled, key=lambda t: (round(t.miou, 4), t.tiling.tile if t.tiling else 0))
    result: dict[str, Any] = {"best": best.tiling.model_dump() if best.tiling else None}
    if views:
        scored = [best] + [trial(best.tiling, tta) for tta in dict.fromkeys(views) if tta != "none"]
        trials += scored[1:]
        best = max(scored, key=lambda t: (round(t.miou, 3), -len(tta_views(t.tta))))
        result["best_tta"] = best.tta
    return result | {
        "best_miou": best.miou,
        "whole_image": {"miou": trials[0].miou, "boundary_f1": trials[0].boundary_f1},
        "trials": [t.record() for t in trials],
        "images": len(pairs),
    }
