"""The correct-and-retrain loop on real data: segment, correct the polygons, retrain on the corrections, and
measure the held-out ground before and after.

1. A deliberately weak model: one epoch from ImageNet on the Kampala scene and its OpenStreetMap footprints.
2. It segments the scene (`deeplab segment --vectorize`): its own building polygons, `polygons.gpkg`.
3. "Correction" as a user would make it in QGIS, inside one training ground block: its predicted polygons
   there are deleted and the OpenStreetMap footprints drawn instead (written as a GeoPackage with the same
   `class_name` attribute); elsewhere the polygons are left as predicted.
4. Retrain with `--init-from` the weak model on the corrected polygons, the area of interest being the block
   that was corrected (where the labels can be trusted), and validate on the zoo's held-out cell against the
   footprints there (`--val-labels`): the card's before-and-after table.
5. Score both models on the held-out cell against the footprints: IoU and object F1 (`deeplab evaluate`).

    python -m bench.label_loop            # about 10 minutes on 2 cores; bench/reports/label-loop.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely
import shapely.geometry

from bench.reporting import machine, write_report

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = "32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764"
# The corrected ground: the zoom-19 cell left of the held-out one (row 1, column 1 of the 1024 px cells)
CORRECTED = (32.594375610351562, 0.35018702872728885, 32.595062255859375, 0.3508736613849764)


def deeplab(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("deeplab")), *args], check=True)


def correct(predicted: Path, footprints: Path, box: tuple[float, ...], out: Path) -> dict[str, int]:
    """The predicted polygons with those inside ``box`` replaced by the footprints there."""
    area = shapely.box(*box)
    _, _, predicted_wkb, _ = pyogrio.raw.read(predicted, columns=["class_name"])
    kept = [g for g in shapely.from_wkb(predicted_wkb) if not g.centroid.within(area)]
    meta, _, footprint_wkb, _ = pyogrio.raw.read(footprints)
    drawn = [shapely.make_valid(g) for g in shapely.from_wkb(footprint_wkb) if g.centroid.within(area)]
    geometries = kept + drawn
    names = np.asarray(["building"] * len(geometries), dtype=object)
    pyogrio.raw.write(
        out, shapely.to_wkb(np.asarray(geometries, dtype=object)), [names], fields=["class_name"],
        geometry_type="Unknown", crs=meta["crs"], driver="GPKG",
    )  # fmt: skip
    return {"predicted_total": len(predicted_wkb), "kept": len(kept), "drawn": len(drawn)}


def held_out(model: Path, scene: Path, footprints: Path, report: Path) -> dict[str, Any]:
    deeplab(
        "evaluate", "--model", str(model), "--scenes", str(scene), "--labels", f"building={footprints}",
        "--val-bbox", HELD_OUT, "--objects", "building", "--report", str(report),
    )  # fmt: skip
    scores = json.loads(report.read_text())["no_crf"]
    return {
        "iou_building": scores["per_class_iou"]["building"],
        "miou": scores["miou"],
        "object_f1": scores["objects"]["building"]["f1"],
        "object_precision": scores["objects"]["building"]["precision"],
        "object_recall": scores["objects"]["building"]["recall"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--arch", default="deeplabv3plus_efficientnet_lite0")
    parser.add_argument("--retrain-epochs", type=int, default=8)
    args = parser.parse_args()
    scene = args.data / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"
    footprints = args.data / "kampala-buildings" / "labels" / "osm-buildings.geojson"
    common = ["--classes", "background,building", "--background-classes", "background", "--arch", args.arch]
    common += ["--val-bbox", HELD_OUT, "--object-f1", "building", "--batch-size", "8", "--crop-size", "256"]
    with tempfile.TemporaryDirectory(prefix="label-loop-") as folder:
        work = Path(folder)
        weak = work / "weak.safetensors"
        first = ["--scenes", str(scene), "--labels", f"building={footprints}", "--pretrained", "imagenet"]
        deeplab("train", *first, *common, "--epochs", "1", "--lr", "0.01", "--seed", "0", "--out", str(weak))
        out = work / "out"
        deeplab("segment", str(scene), "--model", str(weak), "--out", str(out), "--vectorize", "--no-crf")
        corrected = work / "corrected.gpkg"
        edits = correct(work / "out" / scene.stem / "polygons.gpkg", footprints, CORRECTED, corrected)
        aoi = work / "corrected-block.geojson"
        block = {
            "type": "Feature",
            "properties": {},
            "geometry": shapely.geometry.mapping(shapely.box(*CORRECTED)),
        }
        aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [block]}))
        retrained = work / "retrained.safetensors"
        again = [
            "--scenes",
            str(scene),
            "--labels",
            str(corrected),
            "--class-field",
            "class_name",
            "--aoi",
            str(aoi),
            "--val-labels",  # the held-out ground is scored against the footprints, not the model's polygons
            f"building={footprints}",
        ]
        again += [
            "--init-from",
            str(weak),
            "--epochs",
            str(args.retrain_epochs),
            "--lr",
            "0.005",
            "--seed",
            "1",
        ]
        deeplab("train", *again, *common, "--out", str(retrained))
        before = held_out(weak, scene, footprints, work / "before.json")
        after = held_out(retrained, scene, footprints, work / "after.json")
        card = subprocess.run(
            [str(Path(sys.executable).with_name("deeplab")), "card", str(retrained)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    result = {
        "machine": machine(),
        "corrected_block": CORRECTED,
        "edits": edits,
        "before": before,
        "after": after,
    }
    lines = [
        "# The correct-and-retrain loop (bench/label_loop.py)",
        "",
        f"Weak model: {args.arch}, one epoch on the Kampala scene and its OpenStreetMap footprints.",
        f"Corrected: the ground block {CORRECTED}:",
        f"{edits['kept']} of the {edits['predicted_total']} predicted polygons kept outside it,",
        f"{edits['drawn']} footprints drawn inside it. Retrained {args.retrain_epochs} epochs from the weak",
        "model on the corrected polygons, the corrected block as the area of interest.",
        "Held out: the zoo's cell.",
        "",
        "| held-out cell, no CRF | IoU building | mIoU | object F1 | object precision | object recall |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {s['iou_building']:.3f} | {s['miou']:.3f} | {s['object_f1']:.3f} | "
            f"{s['object_precision']:.3f} | {s['object_recall']:.3f} |"
            for name, s in (("weak model (1 epoch)", before), ("after the loop", after))
        ),
        "",
        "The retrained model's card (its before-and-after table):",
        "",
        *[f"    {line}" for line in card.split("## Held-out results")[0].splitlines()[-16:]],
    ]
    write_report("label-loop", result, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
