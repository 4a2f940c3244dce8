"""Object F1 for object classes (buildings, nuclei): SpaceNet's rule, as solaris implements it.

Predicted polygons are taken in order; each is matched to the remaining truth polygon it overlaps with the
highest IoU, and counts as a true positive when that IoU is above the threshold (0.5), which removes the
truth polygon from the pool; otherwise it is a false positive. Truth polygons left unmatched are false
negatives. As in solaris, an invalid predicted polygon is repaired with a zero buffer, an invalid truth
polygon scores IoU 0, ties go to the first truth polygon, and precision, recall and F1 are 0 where undefined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import shapely
import shapely.geometry
from rasterio.features import shapes, sieve
from rasterio.transform import Affine

SPACENET_IOU = 0.5
# DeepLab-v3+ decodes at a quarter of the input's resolution: a region smaller than one 4x4 cell of that grid
# is below what the model resolves. Published polygons merge such regions into their neighbour (the
# vectorizer's sieve), and so does the object count here, so that speckle is not counted as objects.
MIN_REGION_PIXELS = 16


@dataclass(frozen=True)
class ObjectScores:
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 0.0

    @property
    def recall(self) -> float:
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p * r > 0 else 0.0

    def __add__(self, other: ObjectScores) -> ObjectScores:
        return ObjectScores(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
        )

    def summary(self) -> dict[str, float | int]:
        return {
            "f1": round(self.f1, 6),
            "precision": round(self.precision, 6),
            "recall": round(self.recall, 6),
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
        }


NO_OBJECTS = ObjectScores(0, 0, 0)


def match_objects(
    predicted: Sequence[shapely.Geometry], truth: Sequence[shapely.Geometry], threshold: float = SPACENET_IOU
) -> ObjectScores:
    """Greedy one-to-one matching of ``predicted`` to ``truth`` polygons, in the predictions' order."""
    pool = list(truth)
    remaining = list(range(len(pool)))
    tree = shapely.STRtree(pool) if pool else None
    true_positives = false_positives = 0
    for polygon in predicted:
        if not polygon.is_valid:
            polygon = polygon.buffer(0)
        best_index, best_iou = -1, -1.0
        candidates = sorted(int(i) for i in tree.query(polygon, predicate="intersects")) if tree else []
        alive = set(remaining)
        for index in candidates:
            if index not in alive:
                continue
            other = pool[index]
            iou = 0.0
            if polygon.is_valid and other.is_valid:
                union = polygon.union(other).area
                iou = polygon.intersection(other).area / union if union > 0 else 0.0
            if iou > best_iou:
                best_index, best_iou = index, iou
        if best_index >= 0 and best_iou > threshold:
            true_positives += 1
            remaining.remove(best_index)
        else:
            false_positives += 1
    return ObjectScores(true_positives, false_positives, len(remaining))


def mask_polygons(
    labels: np.ndarray, class_id: int, transform: Affine | None = None, valid: np.ndarray | None = None
) -> list[shapely.Geometry]:
    """The connected regions (4-connected) of ``class_id`` in a label raster as polygons, in the raster's
    row-major order; pixels where ``valid`` is False belong to no region."""
    selected = labels == class_id
    if valid is not None:
        selected &= valid
    return [
        shapely.geometry.shape(geometry)
        for geometry, value in shapes(
            selected.astype(np.uint8), mask=selected, transform=transform or Affine.identity()
        )
        if value == 1
    ]


def objects_in(polygons: Iterable[shapely.Geometry], area: shapely.Geometry) -> list[shapely.Geometry]:
    """The polygons whose larger part lies inside ``area`` (what an evaluated window holds)."""
    return [p for p in polygons if p.intersection(area).area > 0.5 * p.area]


class ObjectSource(Protocol):
    """An evaluated image that can say where its predicted and true objects lie (`TrainingImage`)."""

    def objects(self, labels: np.ndarray, class_id: int) -> list[shapely.Geometry]: ...

    def truth_objects(self, truth: np.ndarray, class_id: int) -> list[shapely.Geometry]: ...


@dataclass
class ObjectTally:
    """Object F1 per class, summed over images (SpaceNet's rule: `models.object_metrics`)."""

    classes: dict[str, int]
    ignore_index: int | None
    scores: dict[str, ObjectScores] = field(default_factory=dict)

    def update(self, item: ObjectSource, labels: np.ndarray, truth: np.ndarray) -> None:
        """Predicted regions are sieved as published polygons are (``MIN_REGION_PIXELS``); objects predicted
        where the truth is ignored are not counted (they would be false positives)."""
        raster = labels.astype(np.uint8)
        labels = sieve(raster, MIN_REGION_PIXELS, mask=raster != 255, connectivity=4).astype(np.int64)
        if self.ignore_index is not None:
            labels = np.where(truth == self.ignore_index, self.ignore_index, labels)
        for name, class_id in self.classes.items():
            predicted = item.objects(labels, class_id)
            found = match_objects(predicted, item.truth_objects(truth, class_id))
            self.scores[name] = self.scores.get(name, NO_OBJECTS) + found

    def summary(self) -> dict[str, Any]:
        if not self.classes:
            return {}
        return {"objects": {name: self.scores.get(name, NO_OBJECTS).summary() for name in self.classes}}
