"""`deeplab tune-crf`: the DeepLab paper's coarse-to-fine search of w1, σα, σβ on validation images.

The network runs once per image; every candidate setting then re-runs only the CRF, on fixed crops, in a
process pool. The smoothness kernel stays at the paper's w2 = 3, σγ = 3.

Then the verdict (``crf_verdict``): the chosen setting against no CRF on images the search never saw (every
third image held out, or images given for it). It is recorded in the checkpoint; where the CRF did not help
there, ``segment`` runs the model without it unless told otherwise.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from models.checkpoint import LoadedModel
from models.metadata import CRFParams, CRFVerdict
from models.metrics import PairedBootstrap, SegmentationMetrics
from models.training_images import TrainingImage
from pipeline.crf import refine_labels
from pipeline.tools.evaluate import centre_crop, evaluation_halo, predictions

# context kept around a crop for a model run on whole images: the crop's pixels see what they would in the
# whole image, up to this far (the engine's halo does the same for tiled models)
WHOLE_IMAGE_CONTEXT = 128

Objective = Literal["miou", "boundary_f1"]
COARSE_W1 = (3.0, 5.0, 7.0)
COARSE_SIGMA_ALPHA = (20.0, 50.0, 80.0, 120.0)
COARSE_SIGMA_BETA = (3.0, 5.0, 8.0, 13.0, 20.0)
HOLD_OUT_EVERY = 3  # every third image (in name order) is kept from the search for the verdict


@dataclass(frozen=True)
class Sample:
    image: np.ndarray
    truth: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class Trial:
    params: CRFParams
    score: float
    miou: float
    boundary_f1: float


def collect_samples(loaded: LoadedModel, pairs: list[TrainingImage], crop: int) -> list[Sample]:
    """Model probabilities once per image (on the checkpoint's tiling and test-time views where it records
    them, as the engine runs it), cut to a centre crop to bound the CRF's cost. The model runs only on the
    crop and its context (the halo, or ``WHOLE_IMAGE_CONTEXT``), not on the whole image."""
    tiling = loaded.metadata.tiling
    halo = evaluation_halo(loaded, tiling, loaded.metadata.crf) if tiling else 0
    cut = crop + 2 * (halo or WHOLE_IMAGE_CONTEXT)
    return [
        Sample(
            centre_crop(p.image, crop), centre_crop(p.truth, crop), centre_crop(p.probabilities, crop).copy()
        )
        for p in predictions(loaded, pairs, tiling=tiling, halo=halo, cut=cut)
    ]


def score(
    samples: list[Sample],
    params: CRFParams,
    class_names: list[str],
    ignore_index: int | None,
    input_max: float,
    miou_classes: list[str],
) -> tuple[float, float]:
    metrics = SegmentationMetrics(class_names, ignore_index)
    for sample in samples:
        metrics.update(refine_labels(sample.probabilities, sample.image, params, input_max), sample.truth)
    return metrics.miou(miou_classes), metrics.boundary_f1()


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(samples: list[Sample], context: dict[str, Any]) -> None:
    _WORKER_STATE["samples"] = samples
    _WORKER_STATE["context"] = context


def _score_in_worker(params: CRFParams) -> tuple[float, float]:
    return score(_WORKER_STATE["samples"], params, **_WORKER_STATE["context"])


def grid(
    w1s: Iterable[float], alphas: Iterable[float], betas: Iterable[float], iterations: int
) -> list[CRFParams]:
    return [
        CRFParams(iterations=iterations, w1=w1, sigma_alpha=alpha, sigma_beta=beta)
        for w1, alpha, beta in itertools.product(w1s, alphas, betas)
    ]


def fine_grid(best: CRFParams, iterations: int) -> list[CRFParams]:
    """A finer grid around the coarse optimum: ±1 in w1 and ±25% in each σ."""
    w1s = sorted({max(0.5, best.w1 - 1), best.w1, best.w1 + 1})
    alphas = sorted({best.sigma_alpha * 0.75, best.sigma_alpha, best.sigma_alpha * 1.25})
    betas = sorted({best.sigma_beta * 0.75, best.sigma_beta, best.sigma_beta * 1.25})
    return grid(w1s, alphas, betas, iterations)


def tune(
    loaded: LoadedModel,
    pairs: list[TrainingImage],
    objective: Objective = "miou",
    crop: int = 512,
    iterations: int = 10,
    workers: int | None = None,
    miou_classes: list[str] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> dict[str, Any]:
    """Search, and return the best parameters with the baseline (no CRF, paper defaults) for comparison."""
    metadata = loaded.metadata
    names = [c.name for c in metadata.classes]
    chosen_classes = miou_classes or names
    context: dict[str, Any] = {
        "class_names": names,
        "ignore_index": metadata.ignore_index,
        "input_max": metadata.input_max,
        "miou_classes": chosen_classes,
    }
    samples = collect_samples(loaded, pairs, crop)
    plain = SegmentationMetrics(names, metadata.ignore_index)
    for sample in samples:
        plain.update(sample.probabilities.argmax(0), sample.truth)
    pick = 0 if objective == "miou" else 1
    trials: list[Trial] = []
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(
        max_workers=workers, initializer=_init_worker, initargs=(samples, context)
    ) as pool:

        def run(candidates: list[CRFParams]) -> Trial:
            seen = {t.params for t in trials}
            fresh = [c for c in candidates if c not in seen]
            for params, (miou, bf1) in zip(fresh, pool.map(_score_in_worker, fresh), strict=True):
                trial = Trial(params, (miou, bf1)[pick], miou, bf1)
                trials.append(trial)
                if on_trial:
                    on_trial(trial)
            return max(trials, key=lambda t: t.score)

        # The paper's setting is a candidate too: the search never returns something worse than it.
        paper_params = CRFParams(iterations=iterations)
        coarse_best = run([paper_params, *grid(COARSE_W1, COARSE_SIGMA_ALPHA, COARSE_SIGMA_BETA, iterations)])
        best = run(fine_grid(coarse_best.params, iterations))
        paper = next(t for t in trials if t.params == paper_params)
    return {
        "objective": objective,
        "best": best.params.model_dump(),
        "best_score": {"miou": best.miou, "boundary_f1": best.boundary_f1},
        "no_crf": {"miou": plain.miou(chosen_classes), "boundary_f1": plain.boundary_f1()},
        "paper_defaults": {"miou": paper.miou, "boundary_f1": paper.boundary_f1},
        "images": len(samples),
        "crop": crop,
        "trials": len(trials),
        "coarse_grid": {"w1": COARSE_W1, "sigma_alpha": COARSE_SIGMA_ALPHA, "sigma_beta": COARSE_SIGMA_BETA},
    }


def hold_out(pairs: list[TrainingImage]) -> tuple[list[TrainingImage], list[TrainingImage]]:
    """(search images, verdict images): every ``HOLD_OUT_EVERY``-th image in name order is held out."""
    ordered = sorted(pairs, key=lambda p: p.name)
    held = ordered[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY]
    return [p for p in ordered if p not in held], held


def crf_verdict(
    loaded: LoadedModel,
    pairs: list[TrainingImage],
    params: CRFParams,
    crop: int,
    miou_classes: list[str] | None,
    source: str,
) -> CRFVerdict:
    """``params`` against no CRF on ``pairs`` (images the search did not see), the model run as the engine
    runs it."""
    metadata = loaded.metadata
    names = [c.name for c in metadata.classes]
    chosen = miou_classes or names
    samples = collect_samples(loaded, pairs, crop)
    without, with_ = [], []
    for sample in samples:  # one metrics object per image: the bootstrap resamples images
        plain = SegmentationMetrics(names, metadata.ignore_index)
        plain.update(sample.probabilities.argmax(0), sample.truth)
        refined = SegmentationMetrics(names, metadata.ignore_index)
        refined.update(
            refine_labels(sample.probabilities, sample.image, params, metadata.input_max), sample.truth
        )
        without.append(plain)
        with_.append(refined)
    bootstrap = PairedBootstrap()
    indices = [names.index(name) for name in chosen]
    miou_interval, boundary_interval = bootstrap.intervals(without, with_, indices)
    total_without, total_with = (
        _summed(without, names, metadata.ignore_index),
        _summed(with_, names, metadata.ignore_index),
    )
    return CRFVerdict(
        miou_without=round(total_without.miou(chosen), 4),
        miou_with=round(total_with.miou(chosen), 4),
        boundary_f1_without=round(total_without.boundary_f1(), 4),
        boundary_f1_with=round(total_with.boundary_f1(), 4),
        miou_gain_interval=miou_interval,
        boundary_f1_gain_interval=boundary_interval,
        resamples=bootstrap.resamples,
        images=len(samples),
        source=source,
    )


def _summed(
    per_image: list[SegmentationMetrics], names: list[str], ignore_index: int | None
) -> SegmentationMetrics:
    total = SegmentationMetrics(names, ignore_index)
    for metrics in per_image:
        total.confusion += metrics.confusion
        total.boundary_counts += metrics.boundary_counts
        total.images += metrics.images
    return total
