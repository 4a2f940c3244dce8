"""Fitting a checkpoint's weights to a model of the same architecture with other classes or bands
(`deeplab train --init-from`): the classifier's rows are kept for the classes both share, by name, and new
classes start fresh; the stem's input channels are kept for the bands both share, by name, and a new band
starts from the mean of the kept bands' weights. Which tensors hold classes and which hold bands is found by
building the architecture twice, so no architecture needs to name its head or stem."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.metadata import BandInfo, CheckpointMetadata
from models.registry import build_model


@dataclass(frozen=True)
class Adaptation:
    """What was kept, adapted and started fresh, one line each for the user and the checkpoint."""

    lines: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.lines)


def _varying_keys(
    architecture: str, classes: int, bands: int, stride: int | None
) -> tuple[set[str], set[str]]:
    """(tensors whose first dimension is the class count, tensors whose second is the band count)."""
    base = build_model(architecture, classes, bands, stride, "none").state_dict()
    more = build_model(architecture, classes + 1, bands + 1, stride, "none").state_dict()
    by_class = {k for k, v in base.items() if v.ndim >= 1 and more[k].shape[0] != v.shape[0]}
    by_band = {k for k, v in base.items() if v.ndim >= 2 and more[k].shape[1] != v.shape[1]}
    return by_class, by_band


def _matches(source: list[str], target: list[str]) -> tuple[dict[int, int], str]:
    """target index -> source index, by name; where no name is shared and the counts agree, by position."""
    by_name = {i: source.index(name) for i, name in enumerate(target) if name in source}
    if not by_name and len(source) == len(target):
        return {i: i for i in range(len(target))}, "by position (no name is shared)"
    return by_name, "by name"


def adapt_weights(
    model: nn.Module,
    source_model: nn.Module,
    source: CheckpointMetadata,
    classes: list[str],
    band_names: list[str],
    stride: int | None,
) -> Adaptation:
    """Load ``source_model``'s weights into ``model`` (same architecture), adapting the class and band
    tensors; what was adapted is returned."""
    by_class, by_band = _varying_keys(source.architecture, len(classes), len(band_names), stride)
    own = model.state_dict()
    theirs = source_model.state_dict()
    source_classes = [c.name for c in source.classes]
    source_bands = [b.name for b in source.bands]
    class_map, class_rule = _matches(source_classes, classes)
    band_map, band_rule = _matches(source_bands, band_names)
    same_classes = source_classes == classes
    same_bands = source_bands == band_names
    loaded: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in theirs:
            continue
        weights = theirs[key]
        if key in by_class and not same_classes:
            fresh = target.clone()
            for new, old in class_map.items():
                fresh[new] = weights[old]
            loaded[key] = fresh
        elif key in by_band and not same_bands:
            fresh = target.clone()
            kept = [old for old in band_map.values()]
            mean = weights[:, kept].mean(dim=1) if kept else target[:, 0]
            for new in range(len(band_names)):
                fresh[:, new] = weights[:, band_map[new]] if new in band_map else mean
            loaded[key] = fresh
        elif weights.shape == target.shape:
            loaded[key] = weights
    model.load_state_dict(loaded, strict=False)
    lines = []
    if not same_classes:
        kept_classes = [classes[i] for i in class_map]
        new_classes = [c for i, c in enumerate(classes) if i not in class_map]
        lines.append(
            f"classifier: {len(class_map)} of {len(classes)} classes kept {class_rule} "
            f"({', '.join(kept_classes) or 'none'}); started fresh: {', '.join(new_classes) or 'none'}"
        )
    if not same_bands:
        new_bands = [b for i, b in enumerate(band_names) if i not in band_map]
        lines.append(
            f"stem: {len(band_map)} of {len(band_names)} bands kept {band_rule}; new "
            f"({', '.join(new_bands) or 'none'}) start from the mean of the kept bands' weights"
        )
    return Adaptation(tuple(lines))


def adapted_bands(source: CheckpointMetadata, fresh: list[BandInfo]) -> list[BandInfo]:
    """Normalisation: a kept band keeps the statistics its weights were trained with; a new band takes the
    training data's."""
    band_map, _ = _matches([b.name for b in source.bands], [b.name for b in fresh])
    return [
        source.bands[band_map[i]].model_copy(update={"name": band.name}) if i in band_map else band
        for i, band in enumerate(fresh)
    ]
