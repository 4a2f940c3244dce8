"""The vector-label flags `train` and `evaluate` share, and the scene-and-labels spec they build from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deeplab_common.errors import DeepLabError
from models.scene_training import SceneTrainingSpec


def names(text: str | None) -> list[str]:
    """A comma-separated list of names (empty for none)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def bbox(text: str) -> tuple[float, float, float, float]:
    """minx,miny,maxx,maxy"""
    values = [float(v) for v in text.split(",") if v.strip()]
    if len(values) != 4:
        raise argparse.ArgumentTypeError("expected minx,miny,maxx,maxy")
    return (values[0], values[1], values[2], values[3])


def _value_pairs(text: str | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in names(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise DeepLabError(f"--class-map {text}: expected VALUE=CLASS pairs, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def add_label_flags(group: Any) -> None:
    """--scenes, --labels and how labels become classes and masks."""
    group.add_argument("--scenes", nargs="+", type=Path, help="georeferenced scenes (any raster GDAL reads)")
    group.add_argument(
        "--slides", nargs="+", type=Path, help="whole-slide images, with QuPath annotations as --labels"
    )
    group.add_argument(
        "--labels",
        action="append",
        help="[CLASS=]FILE: polygons (GeoPackage, GeoJSON, FlatGeobuf, Shapefile, QuPath GeoJSON); "
        "CLASS= makes every feature that class, else --class-field (or QuPath's classification) says",
    )
    group.add_argument("--class-field", help="the attribute that holds each feature's class")
    group.add_argument(
        "--class-map",
        help="VALUE=CLASS,...: attribute values (or QuPath classes) to class names; CLASS 'ignore' "
        "leaves them out",
    )
    group.add_argument("--class-priority", help="classes that win where polygons overlap, highest first")
    group.add_argument(
        "--aoi",
        help="polygon file of where labels are complete, or 'extent' (all of each scene); default: where "
        "labels exist, buffered by --aoi-buffer-m (the rest is ignored, not called background)",
    )
    group.add_argument("--aoi-buffer-m", type=float, default=50.0)
    group.add_argument(
        "--invalid-labels", choices=["repair", "skip", "fail"], default="repair", help="invalid polygons"
    )


def scene_spec(
    args: argparse.Namespace, classes: list[str], background: str, pixel_size: float | None
) -> SceneTrainingSpec:
    return SceneTrainingSpec(
        scenes=tuple(args.scenes or ()),
        labels=tuple(args.labels or ()),
        classes=tuple(classes),
        background=background,
        ignore_index=args.ignore_index,
        class_field=args.class_field,
        class_map=_value_pairs(args.class_map),
        class_priority=tuple(names(args.class_priority)),
        aoi=args.aoi,
        aoi_buffer_m=args.aoi_buffer_m,
        block_size=getattr(args, "block_size", 512),
        val_bbox=args.val_bbox,
        val_fraction=getattr(args, "val_fraction", 0.0),
        seed=getattr(args, "seed", 0),
        pixel_size_m=pixel_size,
        invalid=args.invalid_labels,
        val_labels=tuple(getattr(args, "val_labels", None) or ()),
    )
