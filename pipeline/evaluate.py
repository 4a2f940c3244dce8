"""Held-out evaluation of a checkpoint, with and without the dense CRF."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.checkpoint import LoadedModel
from models.data import Pair, list_files, pair_by_stem, read_pair
from models.errors import ConfigError
from models.inference import check_image_fits, predict_image
from models.metadata import CRFParams
from models.metrics import SegmentationMetrics
from models.optimize import for_inference
from pipeline.crf import refine_labels


@dataclass
class Prediction:
    pair: Pair
    image: np.ndarray
    truth: np.ndarray
    probabilities: np.ndarray


def find_pairs(images: str, masks: str) -> list[Pair]:
    return pair_by_stem(list_files(images, "image"), list_files(masks, "mask"))


def predictions(
    loaded: LoadedModel, pairs: list[Pair], scales: tuple[float, ...] = (1.0,)
) -> Iterator[Prediction]:
    """Read and check each pair, then run the model on the whole image (at each of ``scales``), prepared
    for inference as the engine runs it."""
    metadata = loaded.metadata
    model = for_inference(loaded.model)
    for pair in pairs:
        image, truth = read_pair(pair, metadata.num_classes, metadata.ignore_index)
        check_image_fits(pair.image, image, metadata)
        yield Prediction(pair, image, truth, predict_image(model, metadata, image, scales))


def metric_classes(loaded: LoadedModel, exclude: list[str]) -> list[str]:
    names = [c.name for c in loaded.metadata.classes]
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise ConfigError(f"{loaded.path}: no class named {unknown[0]!r} (classes: {', '.join(names)})")
    return [name for name in names if name not in exclude]


def evaluate(
    loaded: LoadedModel,
    pairs: list[Pair],
    with_crf: bool,
    crf_params: CRFParams | None = None,
    exclude_classes: list[str] | None = None,
    on_image: Callable[[str], None] | None = None,
    scales: tuple[float, ...] = (1.0,),
) -> dict[str, Any]:
    """``{"no_crf": ..., "crf": ...}`` (``crf`` only when asked); mIoU over the classes not excluded."""
    metadata = loaded.metadata
    names = [c.name for c in metadata.classes]
    miou_classes = metric_classes(loaded, exclude_classes or [])
    plain = SegmentationMetrics(names, metadata.ignore_index)
    refined = SegmentationMetrics(names, metadata.ignore_index)
    params = crf_params or metadata.crf
    for prediction in predictions(loaded, pairs, scales):
        plain.update(prediction.probabilities.argmax(0), prediction.truth)
        if with_crf:
            labels = refine_labels(prediction.probabilities, prediction.image, params, metadata.input_max)
            refined.update(labels, prediction.truth)
        if on_image:
            on_image(prediction.pair.stem)
    report: dict[str, Any] = {"no_crf": plain.summary(miou_classes) | {"scales": list(scales)}}
    if with_crf:
        report["crf"] = refined.summary(miou_classes) | {"crf_params": params.model_dump()}
    return report
