"""Training-time sampling and augmentation of image/mask crops (torch on CPU, seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    crop_size: int = 256
    scale_range: tuple[float, float] = (0.75, 1.25)
    flips: bool = True
    rotations: bool = True
    colour_jitter: float = 0.2  # brightness and contrast factors drawn from [1 - j, 1 + j]


def random_crop(
    image: torch.Tensor,
    mask: torch.Tensor,
    settings: AugmentSettings,
    rng: np.random.Generator,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one augmented (bands, crop, crop) float crop and its (crop, crop) mask from a raw image.

    The source window is ``crop / scale`` pixels, resized to ``crop`` (bilinear image, nearest mask); where it
    overhangs the image the mask is padded with ``ignore_index`` so padding never trains the model.
    """
    crop = settings.crop_size
    scale = float(rng.uniform(*settings.scale_range))
    source = max(8, round(crop / scale))
    height, width = mask.shape
    top = int(rng.integers(min(0, height - source), max(0, height - source) + 1))
    left = int(rng.integers(min(0, width - source), max(0, width - source) + 1))
    image_window = torch.zeros((image.shape[0], source, source), dtype=torch.float32)
    mask_window = torch.full((source, source), ignore_index, dtype=torch.int64)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + source, height), min(left + source, width)
    dst_top, dst_left = src_top - top, src_left - left
    rows, cols = src_bottom - src_top, src_right - src_left
    image_window[:, dst_top : dst_top + rows, dst_left : dst_left + cols] = image[
        :, src_top:src_bottom, src_left:src_right
    ].float()
    mask_window[dst_top : dst_top + rows, dst_left : dst_left + cols] = mask[
        src_top:src_bottom, src_left:src_right
    ]
    if source != crop:
        image_window = F.interpolate(
            image_window[None], size=(crop, crop), mode="bilinear", align_corners=False
        )[0]
        mask_window = F.interpolate(mask_window[None, None].float(), size=(crop, crop), mode="nearest")[
            0, 0
        ].long()
    if settings.flips and rng.random() < 0.5:
        image_window, mask_window = image_window.flip(-1), mask_window.flip(-1)
    if settings.flips and rng.random() < 0.5:
        image_window, mask_window = image_window.flip(-2), mask_window.flip(-2)
    if settings.rotations:
        turns = int(rng.integers(0, 4))
        image_window = torch.rot90(image_window, turns, dims=(-2, -1))
        mask_window = torch.rot90(mask_window, turns, dims=(-2, -1))
    if settings.colour_jitter > 0:
        jitter = settings.colour_jitter
        brightness = float(rng.uniform(1 - jitter, 1 + jitter))
        contrast = float(rng.uniform(1 - jitter, 1 + jitter))
        mean = image_window.mean(dim=(-2, -1), keepdim=True)
        image_window = ((image_window - mean) * contrast + mean) * brightness
    return image_window.contiguous(), mask_window.contiguous()
