"""Training chips from a slide, labelled by the classical stain method (``models.stain``).

Chips are cut on the slide's level 0 (its own µm/px), kept when they hold enough tissue, and written as
PNG image/mask pairs that ``deeplab train`` reads. Chips whose top edge lies at or below ``holdout_from``
(a fraction of the slide's height) are named ``<stem>-val-...`` and training chips never reach into that
band, so a validation pattern holds out a separate region of tissue rather than overlapping crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.stain import separate_stains, stain_labels
from pipeline.io.slides import SlideBlocks, describe_slide, open_slide
from pipeline.io.tissue import otsu_threshold


@dataclass(frozen=True)
class ChipSummary:
    train: int
    val: int
    nuclei_threshold: float
    class_share: tuple[float, float, float]


def cut_chips(
    slide_path: Path,
    out: Path,
    size: int = 256,
    stride: int = 128,
    min_tissue: float = 0.1,
    holdout_from: float = 0.75,
) -> ChipSummary:
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    info = describe_slide(slide_path)
    width, height = info.level_dimensions[0]
    with open_slide(slide_path) as slide:
        blocks = SlideBlocks(slide, info, 1.0)  # the engine's reader and tissue mask, at level 0
        whole = blocks.read_block(0, 0, height, width).transpose(1, 2, 0)
        tissue = blocks.read_valid(0, 0, height, width)
    haematoxylin = separate_stains(whole)[..., 0][tissue]
    threshold = otsu_threshold(np.clip(haematoxylin / max(float(haematoxylin.max()), 1e-6), 0, 1))
    threshold *= float(haematoxylin.max())
    labels = stain_labels(whole, tissue, threshold)
    boundary = int(height * holdout_from)
    counts = {"train": 0, "val": 0}
    for top in range(0, height - size + 1, stride):
        split = "val" if top >= boundary else "train"
        if split == "train" and top + size > boundary:
            continue  # a training chip never overlaps the held-out band
        for left in range(0, width - size + 1, stride):
            chip_tissue = tissue[top : top + size, left : left + size]
            if chip_tissue.mean() < min_tissue:
                continue
            stem = f"{slide_path.stem}-{split}-y{top:05d}-x{left:05d}"
            Image.fromarray(whole[top : top + size, left : left + size]).save(images / f"{stem}.png")
            Image.fromarray(labels[top : top + size, left : left + size]).save(masks / f"{stem}.png")
            counts[split] += 1
    share = np.bincount(labels.ravel(), minlength=3)[:3] / labels.size
    return ChipSummary(counts["train"], counts["val"], threshold, (share[0], share[1], share[2]))
