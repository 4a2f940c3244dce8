"""Training-time sampling and augmentation of image/mask crops (torch on CPU, seeded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class CropSource(Protocol):
    """What crops are cut from: an image in memory, or a ground block of a scene read on the fly."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def window(self, top: int, left: int, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (bands, size, size) float image and (size, size) mask at ``top``, ``left``; where the window
        overhangs the source, the image is 0 and the mask ``ignore_index``."""
        ...


def clipped(top: int, left: int, size: int, height: int, width: int) -> tuple[int, int, int, int, int, int]:
    """The part of a window inside a ``height`` x ``width`` source: its first row and column there, its rows
    and columns, and where it lands in the window."""
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + size, height), min(left + size, width)
    return (
        src_top,
        src_left,
        max(0, src_bottom - src_top),
        max(0, src_right - src_left),
        src_top - top,
        src_left - left,
    )


def padded(
    image_part: torch.Tensor,
    mask_part: torch.Tensor,
    dst_top: int,
    dst_left: int,
    size: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A window of ``size`` with the part read from the source in place and padding around it."""
    image_window = torch.zeros((image_part.shape[0], size, size), dtype=torch.float32)
    mask_window = torch.full((size, size), ignore_index, dtype=torch.int64)
    rows, cols = mask_part.shape
    image_window[:, dst_top : dst_top + rows, dst_left : dst_left + cols] = image_part.float()
    mask_window[dst_top : dst_top + rows, dst_left : dst_left + cols] = mask_part
    return image_window, mask_window


def random_crop(
    source: CropSource,
    settings: AugmentSettings,
    rng: np.random.Generator,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one augmented (bands, crop, crop) float crop and its (crop, crop) mask from a source.

    The source window is ``crop / scale`` pixels, resized to ``crop`` (bilinear image, nearest mask); where it
    overhangs the source the mask is padded with ``ignore_index`` so padding never trains the model.
    """
    crop = settings.crop_size
    scale = float(rng.uniform(*settings.scale_range))
    size = max(8, round(crop / scale))
    height, width = source.shape
    top = int(rng.integers(min(0, height - size), max(0, height - size) + 1))
    left = int(rng.integers(min(0, width - size), max(0, width - size) + 1))
    image_window, mask_window = source.window(top, left, size, ignore_index)
    if size != crop:
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
