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
        tp = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        return {
            name: (float(tp[i] / union[i]) if union[i] > 0 else None)
            for i, name in enumerate(self.class_names)
        }

    def miou(self, classes: list[str] | None = None) -> float:
        """Mean IoU over classes present in truth or prediction (optionally only the named ones)."""
        ious = self.per_class_iou()
        chosen = [ious[name] for name in (classes or self.class_names)]
        present = [v for v in chosen if v is not None]
        return float(np.mean(present)) if present else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.diag(self.confusion).sum() / total) if total else float("nan")

    def boundary_f1(self) -> float:
        matched_pred, total_pred, matched_truth, total_truth = self.boundary_counts
        precision = matched_pred / total_pred if total_pred else 1.0
        recall = matched_truth / total_truth if total_truth else 1.0
        return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0

    def summary(self, miou_classes: list[str] | None = None) -> dict[str, object]:
        return {
            "miou": self.miou(miou_classes),
            "per_class_iou": self.per_class_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "boundary_f1": self.boundary_f1(),
            "boundary_tolerance_px": self.tolerance_px,
            "images": self.images,
        }


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
