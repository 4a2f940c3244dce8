"""`deeplab tune-tiling`: the core size the engine cuts scenes into for a model, chosen on validation images.

DeepLab-v3/v3+ average features over the whole window in their image-pooling branch. Trained on crops of a
few hundred pixels, they can lose accuracy on much larger windows (measured: landcover-dubai on its
held-out tile, 0.506 mIoU on whole 2000 px images, 0.546 on 384 px windows). Each candidate runs the model
on the engine's windows over the images, without the CRF; whole images are scored alongside for reference.
Tilings are compared on single views, at each candidate set of multi-scale inputs (``--scales``): a scale
below 1 shows the model a window's content in fewer pixels, so tile size and scales interact and are searched
together. Candidate test-time views (``--tta``) are then scored on the best of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from models.checkpoint import LoadedModel
from models.inference import tta_views
from models.metadata import TTA_PHRASES, InputScales, Tiling
from models.training_images import TrainingImage
from pipeline.tools.evaluate import evaluate


@dataclass(frozen=True)
class TilingTrial:
    tiling: Tiling | None  # None: whole images
    miou: float
    boundary_f1: float
    tta: str = "none"
    multiscale: InputScales = field(default_factory=InputScales)

    def describe(self) -> str:
        where = "whole images" if self.tiling is None else self.tiling.describe()
        if not self.multiscale.single:
            where += f", {self.multiscale.describe()}"
        return where if self.tta == "none" else f"{where}, {TTA_PHRASES[self.tta]}"

    def record(self) -> dict[str, Any]:
        return {
            "tiling": self.tiling.model_dump() if self.tiling else "whole image",
            "tta": self.tta,
            "scales": list(self.multiscale.scales),
            "fuse": self.multiscale.fuse,
            "miou": self.miou,
            "boundary_f1": self.boundary_f1,
        }

    def rank(self) -> tuple[float, int, int]:
        """Best mIoU (to 4 places); ties to fewer scales (fewer passes), then the larger core (fewer
        windows)."""
        return (round(self.miou, 4), -len(self.multiscale.scales), self.tiling.tile if self.tiling else 0)


def tune_tiling(
    loaded: LoadedModel,
    pairs: list[TrainingImage],
    tiles: Iterable[int],
    cores_per_window: int,
    exclude_classes: list[str] | None = None,
    on_trial: Callable[[TilingTrial], None] | None = None,
    views: Iterable[str] = (),
    multiscales: Iterable[InputScales] = (),
) -> dict[str, Any]:
    """Score every candidate core size at each of ``multiscales`` (none given: the checkpoint's scales) by
    mIoU without CRF (``TilingTrial.rank`` breaks ties), then each of ``views`` (test-time augmentations)
    on the best one (ties to fewer model passes). Returns ``{"best": tiling, "trials": [...],
    "whole_image": ...}``, with ``multiscales`` ``best_scales``, with ``views`` ``best_tta``."""

    def trial(tiling: Tiling | None, multiscale: InputScales, tta: str) -> TilingTrial:
        report = evaluate(
            loaded,
            pairs,
            False,
            exclude_classes=exclude_classes,
            multiscale=multiscale,
            tiling=tiling,
            tta=tta,
        )
        no_crf = report["no_crf"]
        done = TilingTrial(tiling, no_crf["miou"], no_crf["boundary_f1"], tta, multiscale)
        if on_trial:
            on_trial(done)
        return done

    scale_sets = list(dict.fromkeys(multiscales)) or [loaded.metadata.multiscale()]
    candidates = [Tiling(tile=tile, cores_per_window=cores_per_window) for tile in sorted(set(tiles))]
    if not candidates:
        raise ValueError("tune_tiling needs at least one core size")
    trials = [trial(None, scale_sets[0], "none")]  # whole images, for reference
    trials += [trial(tiling, multiscale, "none") for multiscale in scale_sets for tiling in candidates]
    best = max(trials[1:], key=TilingTrial.rank)
    result: dict[str, Any] = {"best": best.tiling.model_dump() if best.tiling else None}
    if multiscales:
        result["best_scales"] = best.multiscale.model_dump(mode="json")
    if views:
        scored = [best] + [
            trial(best.tiling, best.multiscale, tta) for tta in dict.fromkeys(views) if tta != "none"
        ]
        trials += scored[1:]
        best = max(scored, key=lambda t: (round(t.miou, 3), -len(tta_views(t.tta))))
        result["best_tta"] = best.tta
    return result | {
        "best_miou": best.miou,
        "whole_image": {"miou": trials[0].miou, "boundary_f1": trials[0].boundary_f1},
        "trials": [t.record() for t in trials],
        "images": len(pairs),
    }
