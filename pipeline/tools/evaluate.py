"""Held-out evaluation of a checkpoint, with and without the dense CRF."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from deeplab_common.errors import ConfigError, DataError
from models.checkpoint import LoadedModel
from models.data import list_files, pair_by_stem
from models.inference import check_image_fits, predict_image
from models.metadata import CRFParams, InputScales, Tiling
from models.metrics import SegmentationMetrics
from models.object_metrics import ObjectTally
from models.scene_training import SceneTrainingSpec, evaluation_blocks
from models.training_images import PairOnDisk, TrainingImage
from pipeline.crf import CPU_DEFAULT, refine_labels
from pipeline.engine.grid import core_of, model_halo, plan_tiles
from pipeline.engine.workers import ModelWorker, read_windows, window_batches
from pipeline.io.labels import NODATA_LABEL


@dataclass
class Prediction:
    item: TrainingImage
    image: np.ndarray
    truth: np.ndarray
    probabilities: np.ndarray


def find_pairs(images: str, masks: str, loaded: LoadedModel) -> list[TrainingImage]:
    """Image/mask pairs matched by stem, read one at a time as they are evaluated."""
    metadata = loaded.metadata
    pairs = pair_by_stem(list_files(images, "image"), list_files(masks, "mask"))
    return [PairOnDisk(pair, metadata.num_classes, metadata.ignore_index) for pair in pairs]


def predictions(
    loaded: LoadedModel,
    items: Sequence[TrainingImage],
    multiscale: InputScales | None = None,
    tiling: Tiling | None = None,
    halo: int = 0,
    tta: str | None = None,
    cut: int | None = None,
) -> Iterator[Prediction]:
    """Read and check each pair, then run the model (at each of ``multiscale``'s scales; None: the
    checkpoint's), prepared for inference as the engine runs it: on the whole image, or with ``tiling`` on
    the engine's windows (``halo`` around cores); ``tta``: the test-time views (None: the checkpoint's).
    ``cut``: only a centre crop of this size of each image (and its mask) is predicted."""
    metadata = loaded.metadata
    tta = metadata.views(tta)
    multiscale = multiscale or metadata.multiscale()
    worker = ModelWorker(str(loaded.path), device="cpu", threads=None, amp=False, loaded=loaded)
    for item in items:
        image_tensor, truth_tensor = item.whole()
        image, truth = image_tensor.numpy(), truth_tensor.numpy()
        check_image_fits(item.where, image, metadata)
        if cut is not None:
            image, truth = centre_crop(image, cut), centre_crop(truth, cut)
        if tiling is None:
            probabilities = predict_image(worker.model, metadata, image, multiscale, tta)
        else:
            probabilities = tiled_probabilities(worker, image, tiling, halo, multiscale, tta)
        yield Prediction(item, image, truth, probabilities)


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    height, width = array.shape[-2:]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return array[..., top : top + size, left : left + size]


def tiled_probabilities(
    worker: ModelWorker,
    image: np.ndarray,
    tiling: Tiling,
    halo: int,
    multiscale: InputScales,
    tta: str = "none",
) -> np.ndarray:
    """(classes, H, W) probabilities of ``image`` as the engine computes them: the cores of its plan, each
    from its block's window (the engine's own batching and worker), stitched."""
    height, width = image.shape[-2:]
    tiles = plan_tiles(height, width, tiling.tile, halo, tiling.cores_per_window)
    stitched = np.empty((worker.loaded.metadata.num_classes, height, width), dtype=np.float32)
    for batch in window_batches([(tile, None) for tile in tiles], 4):
        windows = read_windows(image, batch)
        results = worker.predict(windows, multiscale.scales, multiscale.fuse, True, tta=tta)
        for members, result in zip(batch, results, strict=True):
            for tile, _ in members:
                rows = slice(tile.core_top, tile.core_top + tile.core_height)
                cols = slice(tile.core_left, tile.core_left + tile.core_width)
                stitched[:, rows, cols] = core_of(result, tile)
    return stitched


def evaluation_halo(
    loaded: LoadedModel, tiling: Tiling, crf_params: CRFParams | None, multiscale: InputScales | None = None
) -> int:
    """The halo ``deeplab segment`` reads around ``tiling``'s cores (with the CRF on when it is evaluated,
    at ``multiscale``'s scales; None: the checkpoint's)."""
    sigma_alpha = crf_params.sigma_alpha if crf_params else None
    min_scale = min((multiscale or loaded.metadata.multiscale()).scales)
    return model_halo(loaded.metadata, sigma_alpha, tiling.tile, min_scale=min_scale)


def class_ids(source: object, classes: list[str], names: list[str]) -> dict[str, int]:
    """``names`` -> their ids among ``classes``; a name that is not a class is an error naming ``source``."""
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ConfigError(f"{source}: no class named {unknown[0]!r} (classes: {', '.join(classes)})")
    return {name: classes.index(name) for name in names}


def metric_classes(loaded: LoadedModel, exclude: list[str]) -> list[str]:
    names = [c.name for c in loaded.metadata.classes]
    class_ids(loaded.path, names, exclude)
    return [name for name in names if name not in exclude]


def evaluate(
    loaded: LoadedModel,
    items: Sequence[TrainingImage],
    with_crf: bool,
    crf_params: CRFParams | None = None,
    exclude_classes: list[str] | None = None,
    on_image: Callable[[str], None] | None = None,
    multiscale: InputScales | None = None,
    tiling: Tiling | None = None,
    tta: str | None = None,
    crf_backend: str = CPU_DEFAULT,
    object_classes: list[str] | None = None,
) -> dict[str, Any]:
    """``{"no_crf": ..., "crf": ...}`` (``crf`` only when asked); mIoU over the classes not excluded, and
    the object F1 of ``object_classes`` (None: the checkpoint's classes of small objects).

    ``tiling``: the model runs on the engine's windows, not on whole images. The CRF still refines the
    whole image's stitched probabilities; the engine's CRF refines each core with its reach (3 σα) of
    context, at most the halo, and agrees with that where the reach fits in the halo."""
    metadata = loaded.metadata
    names = [c.name for c in metadata.classes]
    miou_classes = metric_classes(loaded, exclude_classes or [])
    plain = SegmentationMetrics(names, metadata.ignore_index)
    refined = SegmentationMetrics(names, metadata.ignore_index)
    params = crf_params or metadata.crf
    multiscale = multiscale or metadata.multiscale()
    halo = evaluation_halo(loaded, tiling, params if with_crf else None, multiscale) if tiling else 0
    tta = metadata.views(tta)
    objects = object_class_ids(loaded, object_classes)
    plain_objects = ObjectTally(objects, metadata.ignore_index)
    refined_objects = ObjectTally(objects, metadata.ignore_index)
    for prediction in predictions(loaded, items, multiscale, tiling, halo, tta):
        labels = prediction.probabilities.argmax(0)
        plain.update(labels, prediction.truth)
        plain_objects.update(prediction.item, labels, prediction.truth)
        if with_crf:
            image, probabilities = prediction.image, prediction.probabilities
            labels = refine_labels(probabilities, image, params, metadata.input_max, backend_name=crf_backend)
            refined.update(labels, prediction.truth)
            refined_objects.update(prediction.item, labels, prediction.truth)
        if on_image:
            on_image(prediction.item.name)
    inference = {
        "scales": list(multiscale.scales),
        "fuse": multiscale.fuse,
        "tta": tta,
        "tiling": tiling.model_dump() | {"halo": halo} if tiling else "whole image",
    }
    report: dict[str, Any] = {"no_crf": plain.summary(miou_classes) | plain_objects.summary() | inference}
    if with_crf:
        report["crf"] = (
            refined.summary(miou_classes)
            | refined_objects.summary()
            | {
                "crf_params": params.model_dump(),
                "crf_backend": crf_backend,
            }
        )
    return report


def object_class_ids(loaded: LoadedModel, names: list[str] | None) -> dict[str, int]:
    """The classes scored by object F1: ``names``, or the checkpoint's classes of small objects."""
    classes = [c.name for c in loaded.metadata.classes]
    if names is None:
        names = [c.name for c in loaded.metadata.classes if c.role == "object"]
    return class_ids(loaded.path, classes, names)


def evaluate_mask(
    mask: Path, spec_for: Callable[[list[str], str, int], SceneTrainingSpec], object_classes: list[str] | None
) -> dict[str, Any]:
    """A published mask (its classes from its ``DEEPLAB_CLASSES`` tag) against vector labels rasterised on its
    grid: ``{"mask": ...}`` with per-class IoU, boundary F1 and the object F1 of ``object_classes`` (None:
    every class but the first)."""
    classes = mask_classes(mask)
    spec = spec_for(classes, classes[0], NODATA_LABEL)
    _, blocks = evaluation_blocks(spec)
    metrics = SegmentationMetrics(classes, NODATA_LABEL)
    names = classes[1:] if object_classes is None else object_classes
    tally = ObjectTally(class_ids(mask, classes, names), NODATA_LABEL)
    for block in blocks:
        image, truth = block.whole()
        labels, truth_array = image[0].numpy().astype(np.int64), truth.numpy()
        metrics.update(np.where(labels == NODATA_LABEL, NODATA_LABEL, labels), truth_array)
        tally.update(block, labels, truth_array)
    return {"mask": metrics.summary() | tally.summary() | {"file": str(mask)}}


def mask_classes(mask: Path) -> list[str]:
    """The class names a published mask carries in its tags."""
    try:
        with rasterio.open(mask) as dataset:
            tag = dataset.tags().get("DEEPLAB_CLASSES")
    except rasterio.errors.RasterioIOError as error:
        raise DataError(f"{mask}: not a readable raster ({error})") from None
    if not tag:
        raise DataError(f"{mask}: has no DEEPLAB_CLASSES tag; is it a mask deeplab segment published?")
    return list(json.loads(tag))
