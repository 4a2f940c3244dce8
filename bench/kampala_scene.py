"""Kampala scene check: segment the real z21 mosaic with the engine, score it against the scene's building
mask per zoom-19 ground cell (1024x1024 px), and report the held-out cell separately.

    python bench/kampala_scene.py --model models/zoo/buildings-kampala.safetensors --out models/zoo/reports \
        --tile 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import rasterio

from deeplab_common.atomic import write_text_atomically
from models.metrics import SegmentationMetrics
from pipeline.engine.driver import run_batch
from pipeline.engine.options import SegmentOptions

CELL = 1024  # one zoom-19 tile = 4x4 zoom-21 chips of 256 px
HELD_OUT = (1, 2)  # row, column of the held-out cell 309614/261633 in the mosaic


def score(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    metrics = SegmentationMetrics(["background", "building"])
    metrics.update(prediction, truth)
    tp = int(((prediction == 1) & (truth == 1)).sum())
    return {
        "iou_building": float(metrics.per_class_iou()["building"] or 0.0),
        "precision": tp / max(1, int((prediction == 1).sum())),
        "recall": tp / max(1, int((truth == 1).sum())),
        "boundary_f1": metrics.boundary_f1(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kampala-buildings/scene"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", choices=["ray", "local"], default="local")
    parser.add_argument("--tile", type=int, help="core size (the engine's --tile; default: the checkpoint's)")
    args = parser.parse_args()
    scene, truth_path = args.data / "kampala_z21_rgb.tif", args.data / "kampala_z21_buildings.tif"
    with rasterio.open(truth_path) as dataset:
        truth = dataset.read(1)
    report: dict[str, object] = {
        "model": str(args.model),
        "scene": str(scene),
        "tile": args.tile or "the checkpoint's",
    }
    for crf in (False, True):
        options = SegmentOptions(crf=crf, engine=args.engine, tile=args.tile)
        work = args.out / f".scene-{args.model.stem}-{'crf' if crf else 'no-crf'}"
        batch = run_batch([scene], args.model, work, options)
        if batch.failed:
            raise SystemExit(batch.failed[0].message)
        with rasterio.open(work / scene.stem / "mask.tif") as dataset:
            prediction = dataset.read(1)
        cells = {
            f"{r},{c}": score(
                prediction[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL],
                truth[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL],
            )
            for r in range(truth.shape[0] // CELL)
            for c in range(truth.shape[1] // CELL)
        }
        held = f"{HELD_OUT[0]},{HELD_OUT[1]}"
        report["crf" if crf else "no_crf"] = {
            "whole_scene": score(prediction, truth),
            "held_out_cell": cells[held],
            "cells": cells,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / f"{args.model.stem}.scene.json", json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k in ("no_crf", "crf")}, indent=1)[:2000])


if __name__ == "__main__":
    main()
