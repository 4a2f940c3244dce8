"""Segmentation metrics accumulated over images: confusion matrix, IoU, pixel accuracy, boundary F1."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

BOUNDARY_TOLERANCE_PX = 2


def boundary_map(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another class (both valid)."""
    edges = np.zeros(labels.shape, dtype=bool)
    horizontal = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    vertical = (labels[1:, :] != labels[:-1, :]) & valid[1:, :] & valid[:-1, :]
    edges[:, :-1] |= horizontal
    edges[:-1, :] |= vertical
    return edges


@dataclass
class SegmentationMetrics:
    """Add (prediction, truth) pairs with :meth:`update`; read totals with :meth:`summary`."""

    class_names: list[str]
    ignore_index: int | None = 255
    tolerance_px: int = BOUNDARY_TOLERANCE_PX
    confusion: np.ndarray = field(init=False)
    images: int = 0
    boundary_counts: np.ndarray = field(init=False)  # matched pred, total pred, matched truth, total truth

    def __post_init__(self) -> None:
        n = len(self.class_names)
        self.confusion = np.zeros((n, n), dtype=np.int64)
        self.boundary_counts = np.zeros(4, dtype=np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
        n = len(self.class_names)
        valid = (truth >= 0) & (truth < n)
        if self.ignore_index is not None:
            valid &= truth != self.ignore_index
        index = truth[valid].astype(np.int64) * n + prediction[valid].astype(np.int64)
        self.confusion += np.bincount(index, minlength=n * n).reshape(n, n)
        self.boundary_counts += _boundary_counts(prediction, truth, valid, self.tolerance_px)
        self.images += 1

    def per_class_iou(self) -> dict[str, float | None]:
        return dict(zip(self.class_names, class_ious(self.confusion), strict=True))

    def miou(self, classes: list[str] | None = None) -> float:
        """Mean IoU over classes present in truth or prediction (optionally only the named ones)."""
        chosen = [self.class_names.index(name) for name in classes or self.class_names]
        return mean_iou(self.confusion, chosen)

    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.diag(self.confusion).sum() / total) if total else float("nan")

    def boundary_f1(self) -> float:
        return boundary_f1_of(self.boundary_counts)

    def summary(self, miou_classes: list[str] | None = None) -> dict[str, object]:
        return {
            "miou": self.miou(miou_classes),
            "per_class_iou": self.per_class_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "boundary_f1": self.boundary_f1(),
            "boundary_tolerance_px": self.tolerance_px,
            "images": self.images,
        }


def class_ious(confusion: np.ndarray) -> list[float | None]:
    """IoU per class of a (truth, prediction) confusion matrix; None for a class in neither."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(len(tp))]


def mean_iou(confusion: np.ndarray, classes: list[int]) -> float:
    ious = class_ious(confusion)
    present = [iou for iou in (ious[i] for i in classes) if iou is not None]
    return float(np.mean(present)) if present else float("nan")


def boundary_f1_of(counts: np.ndarray) -> float:
    matched_pred, total_pred, matched_truth, total_truth = counts
    precision = matched_pred / total_pred if total_pred else 1.0
    recall = matched_truth / total_truth if total_truth else 1.0
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


@dataclass(frozen=True)
class PairedBootstrap:
    """How sure a gain is: images resampled with replacement, the same images for both sides each time
    (paired), the gain recomputed from the resample's summed counts; the 2.5th and 97.5th percentiles."""

    resamples: int = 2000
    seed: int = 0

    def intervals(
        self, without: list[SegmentationMetrics], with_: list[SegmentationMetrics], classes: list[int]
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """(mIoU gain interval, boundary-F1 gain interval); ``without`` and ``with_`` hold one entry per
        image, in the same order."""
        if len(without) != len(with_) or not without:
            raise ValueError("a paired bootstrap needs the same images on both sides")
        rng = np.random.default_rng(self.seed)
        confusion = np.stack([m.confusion for m in without]), np.stack([m.confusion for m in with_])
        boundary = (
            np.stack([m.boundary_counts for m in without]),
            np.stack([m.boundary_counts for m in with_]),
        )
        miou_gains, boundary_gains = [], []
        for _ in range(self.resamples):
            chosen = rng.integers(0, len(without), len(without))
            miou_gains.append(
                mean_iou(confusion[1][chosen].sum(0), classes)
                - mean_iou(confusion[0][chosen].sum(0), classes)
            )
            boundary_gains.append(
                boundary_f1_of(boundary[1][chosen].sum(0)) - boundary_f1_of(boundary[0][chosen].sum(0))
            )
        return _percentiles(miou_gains), _percentiles(boundary_gains)


def _percentiles(values: list[float]) -> tuple[float, float]:
    low, high = np.nanpercentile(np.asarray(values), [2.5, 97.5])
    return (round(float(low), 5), round(float(high), 5))


def _boundary_counts(
    prediction: np.ndarray, truth: np.ndarray, valid: np.ndarray, tolerance: int
) -> np.ndarray:
    pred_edges = boundary_map(prediction, valid)
    truth_edges = boundary_map(truth, valid)
    # Distance from every pixel to the nearest boundary pixel of the other map.
    to_truth = ndimage.distance_transform_edt(~truth_edges) if truth_edges.any() else None
    to_pred = ndimage.distance_transform_edt(~pred_edges) if pred_edges.any() else None
    matched_pred = int((to_truth[pred_edges] <= tolerance).sum()) if to_truth is not None else 0
    matched_truth = int((to_pred[truth_edges] <= tolerance).sum()) if to_pred is not None else 0
    return np.array(
        [matched_pred, int(pred_edges.sum()), matched_truth, int(truth_edges.sum())], dtype=np.int64
    )
