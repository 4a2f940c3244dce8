from __future__ import annotations

import numpy as np
import pytest

from models.metrics import SegmentationMetrics, boundary_map


def test_iou_accuracy_and_ignore() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    prediction = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    metrics = SegmentationMetrics(["a", "b"], ignore_index=255)
    metrics.update(prediction, truth)
    # class a: tp 3, fp 1, fn 1 -> 3/5; class b: tp 2, fp 1, fn 1 -> 2/4
    assert metrics.per_class_iou() == {"a": pytest.approx(0.6), "b": pytest.approx(0.5)}
    assert metrics.miou() == pytest.approx(0.55)
    assert metrics.pixel_accuracy() == pytest.approx(5 / 7)
    assert metrics.miou(["b"]) == pytest.approx(0.5)


def test_absent_class_is_none_and_left_out_of_the_mean() -> None:
    metrics = SegmentationMetrics(["a", "b", "c"])
    metrics.update(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert metrics.per_class_iou() == {"a": 1.0, "b": None, "c": None}
    assert metrics.miou() == 1.0


def test_boundary_f1_tolerates_small_shifts_only() -> None:
    truth = np.zeros((40, 40), int)
    truth[10:30, 10:30] = 1
    exact, near, far = (SegmentationMetrics(["a", "b"]) for _ in range(3))
    exact.update(truth, truth)
    near.update(np.roll(truth, 1, axis=1), truth)
    far.update(np.roll(truth, 6, axis=1), truth)
    assert exact.boundary_f1() == 1.0
    assert near.boundary_f1() == 1.0
    assert far.boundary_f1() < 0.6


def test_boundaries_into_ignored_pixels_do_not_count() -> None:
    labels = np.array([[0, 1], [0, 1]])
    assert boundary_map(labels, np.ones((2, 2), bool)).sum() == 2
    assert boundary_map(labels, np.array([[True, False], [True, False]])).sum() == 0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationMetrics(["a"]).update(np.zeros((2, 2), int), np.zeros((3, 2), int))
