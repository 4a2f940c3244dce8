"""From `deeplab train --scenes ... --labels ...` to training and validation blocks, and the record a
checkpoint keeps of them: each label source (file, sha256, features, repairs), the area of interest, the
split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deeplab_common.digest import file_sha256
from deeplab_common.errors import ConfigError, DataError
from models.scene_blocks import (
    LabelledImage,
    LabelledScene,
    SceneBlock,
    SceneRules,
    check_labels_land,
    ground_blocks,
    open_scene,
    region_block,
    split_blocks,
)
from models.vector_labels import InvalidPolicy, LabelRules, LabelSet, read_labels


@dataclass(frozen=True)
class SceneTrainingSpec:
    """The train command's options for scenes with vector labels."""

    scenes: tuple[Path, ...]
    labels: tuple[str, ...]  # "FILE" or "CLASS=FILE"
    classes: tuple[str, ...]
    background: str
    ignore_index: int
    class_field: str | None = None
    class_map: tuple[tuple[str, str], ...] = ()
    class_priority: tuple[str, ...] = ()  # highest first; default: the classes in reverse id order
    aoi: str | None = None  # a polygon file, "extent", or None: the labels buffered by aoi_buffer_m
    aoi_buffer_m: float = 50.0
    block_size: int = 512
    val_bbox: tuple[float, float, float, float] | None = None
    val_fraction: float = 0.2
    seed: int = 0
    pixel_size_m: float | None = None
    invalid: InvalidPolicy = "repair"
    val_labels: tuple[str, ...] = ()  # other labels for the held-out blocks (default: --labels)


@dataclass(frozen=True)
class SceneTrainingData:
    train: list[SceneBlock]
    val: list[SceneBlock]
    labels: list[LabelSet]
    description: dict[str, Any]

    @property
    def lines(self) -> list[str]:
        """What a user should read about the labels: repairs, features left out, notes."""
        return [line for label in self.labels for line in label.lines]


def label_file_and_class(spec: str, classes: tuple[str, ...]) -> tuple[Path, str | None]:
    """``CLASS=FILE`` names the class of every feature in FILE; a plain ``FILE`` takes classes from its
    attributes (or from QuPath's classification)."""
    name, sep, rest = spec.partition("=")
    if sep and name in classes:
        return Path(rest), name
    if sep and not Path(spec).exists() and "/" not in name:
        raise ConfigError(f"--labels {spec}: {name!r} is not one of the classes ({', '.join(classes)})")
    return Path(spec), None


def read_label_files(spec: SceneTrainingSpec) -> list[LabelSet]:
    labels = []
    for text in spec.labels:
        path, file_class = label_file_and_class(text, spec.classes)
        rules = LabelRules(
            classes=spec.classes,
            file_class=file_class,
            class_field=spec.class_field,
            class_map=dict(spec.class_map),
            invalid=spec.invalid,
        )
        labels.append(read_labels(path, rules))
    return labels


def scene_rules(spec: SceneTrainingSpec) -> SceneRules:
    if spec.background not in spec.classes:
        raise ConfigError(f"background class {spec.background!r} is not one of {', '.join(spec.classes)}")
    unknown = [name for name in spec.class_priority if name not in spec.classes]
    if unknown:
        raise ConfigError(f"--class-priority: {unknown[0]!r} is not one of {', '.join(spec.classes)}")
    order = list(spec.class_priority) + [c for c in reversed(spec.classes) if c not in spec.class_priority]
    return SceneRules(
        background=spec.classes.index(spec.background),
        priority=tuple(spec.classes.index(name) for name in order),
        ignore_index=spec.ignore_index,
    )


def labelled_scenes(spec: SceneTrainingSpec) -> tuple[list[LabelSet], list[LabelledScene]]:
    """The label files read and checked, and each scene with the labels that fall on it."""
    if not spec.scenes:
        raise ConfigError("--scenes: give at least one scene")
    if not spec.labels:
        raise ConfigError("--labels: give at least one label file with --scenes")
    labels = read_label_files(spec)
    rules = scene_rules(spec)
    scenes = [
        open_scene(Path(path), labels, rules, spec.aoi, spec.aoi_buffer_m, spec.pixel_size_m)
        for path in spec.scenes
    ]
    check_labels_land(labels, scenes)
    return labels, scenes


def evaluation_blocks(spec: SceneTrainingSpec) -> tuple[list[LabelSet], list[SceneBlock]]:
    """One block per scene to evaluate on: all of it, or its part inside ``spec.val_bbox``."""
    labels, scenes = labelled_scenes(spec)
    return labels, [region_block(scene, spec.val_bbox) for scene in scenes]


def scene_training_data(spec: SceneTrainingSpec) -> SceneTrainingData:
    labels, scenes = labelled_scenes(spec)
    images = [{"file": Path(p).name, "sha256": file_sha256(Path(p))} for p in spec.scenes]
    source = {"source": "scenes+vector labels", "scenes": images}
    default_aoi = {"kind": "labels buffered", "buffer_m": spec.aoi_buffer_m}
    validation = labelled_scenes(validation_spec(spec)) if spec.val_labels else None
    return training_blocks(spec, labels, scenes, source, default_aoi, validation)


def validation_spec(spec: SceneTrainingSpec) -> SceneTrainingSpec:
    """``--val-labels``: the held-out blocks are labelled by other files (where they are trusted), with their
    own area of interest (the default: around those labels)."""
    if spec.val_bbox is None:
        raise ConfigError("--val-labels needs --val-bbox: the held-out ground they label")
    return replace(spec, labels=spec.val_labels, aoi=None, class_field=None, class_map=(), val_labels=())


def training_blocks(
    spec: SceneTrainingSpec,
    labels: list[LabelSet],
    images: Sequence[LabelledImage],
    source: dict[str, Any],
    default_aoi: dict[str, Any],
    validation: tuple[list[LabelSet], Sequence[LabelledImage]] | None = None,
) -> SceneTrainingData:
    """Labelled images (scenes or slides) cut into ground blocks and split; the record of how.
    ``validation``: the same images with other labels, whose blocks in ``spec.val_bbox`` are held out."""
    if not 0 <= spec.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), not {spec.val_fraction}")
    blocks = [block for image in images for block in ground_blocks(image, spec.block_size)]
    if not blocks:
        names = ", ".join(str(image.path) for image in images)
        raise DataError(f"{names}: no ground block reaches the area of interest")
    train, val, left_out = split_blocks(blocks, spec.val_bbox, spec.val_fraction, spec.seed)
    if validation is not None:
        held = [block for image in validation[1] for block in ground_blocks(image, spec.block_size)]
        _, val, _ = split_blocks(held, spec.val_bbox, spec.val_fraction, spec.seed)
    if spec.val_bbox is not None and not val:
        raise DataError(f"--val-bbox {spec.val_bbox}: no block is centred in it (in the labels' coordinates)")
    description = {
        **source,
        "labels": [label.record(spec.classes) for label in labels],
        **({"val_labels": [label.record(spec.classes) for label in validation[0]]} if validation else {}),
        "class_rules": {
            "class_field": spec.class_field,
            "class_map": dict(spec.class_map),
            "priority": [spec.classes[i] for i in scene_rules(spec).priority],
            "background": spec.background,
            "invalid": spec.invalid,
        },
        "aoi": _aoi_record(spec, default_aoi),
        "split": {
            "by": "val_bbox" if spec.val_bbox is not None else "seeded block fraction",
            "val_bbox": spec.val_bbox,
            "val_fraction": None if spec.val_bbox is not None else spec.val_fraction,
            "seed": spec.seed,
            "block_size": spec.block_size,
            "left_out_touching_val": left_out,
        },
        "train_images": len(train),
        "val_images": len(val),
        "blocks": [block.record() for block in train + val],
    }
    return SceneTrainingData(train, val, labels, description)


def _aoi_record(spec: SceneTrainingSpec, default: dict[str, Any]) -> dict[str, Any]:
    if spec.aoi == "extent":
        return {"kind": "extent"}
    if spec.aoi:
        return {"kind": "file", "file": Path(spec.aoi).name, "sha256": file_sha256(Path(spec.aoi))}
    return default
