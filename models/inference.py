"""From raw pixels to class probabilities with a loaded checkpoint: normalisation and the forward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_common.errors import ConfigError, DataError
from models.metadata import TTA_CHOICES, BandInfo, CheckpointMetadata, InputScales


def normalise(image: np.ndarray, bands: Sequence[BandInfo]) -> torch.Tensor:
    """(bands, H, W) raw values -> float32 tensor ``(value - mean) / std`` per band."""
    mean = torch.tensor([b.mean for b in bands], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor([b.std for b in bands], dtype=torch.float32).view(-1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(image)).float() - mean) / std


def autocast_for(device: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision on CUDA only: bf16 autocast is slower than fp32 on the CPUs we measured."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


SIZE_MULTIPLE = 32  # the largest output stride in the family (16) times two: every stride divides it

# Test-time augmentation: each view is (transpose, flip rows, flip columns) of the padded window. Aerial and
# slide imagery has no "up", so the dihedral group's views are as likely as the original.
Transform = tuple[bool, bool, bool]
TTA_VIEWS: dict[str, tuple[Transform, ...]] = {
    "none": ((False, False, False),),
    "hflip": ((False, False, False), (False, False, True)),
    "flips": ((False, False, False), (False, False, True), (False, True, False), (False, True, True)),
    "d4": tuple((t, r, c) for t in (False, True) for r in (False, True) for c in (False, True)),
}


def _flip(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    dims = [d for d, flip in ((-2, transform[1]), (-1, transform[2])) if flip]
    return batch.flip(dims) if dims else batch


def _view(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    return _flip(batch.transpose(-1, -2) if transform[0] else batch, transform)


def _unview(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    batch = _flip(batch, transform)
    return batch.transpose(-1, -2) if transform[0] else batch


def tta_views(tta: str) -> tuple[Transform, ...]:
    if tta not in TTA_VIEWS:
        raise ConfigError(f"unknown test-time augmentation {tta!r} (choose from {', '.join(TTA_CHOICES)})")
    return TTA_VIEWS[tta]


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    fuse: str = "max",
    amp: bool = False,
    tta: str = "none",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N, classes, H, W) for a normalised batch; scales are fused as in the paper,
    after the logits of ``tta``'s flipped/transposed views (``TTA_VIEWS``) are averaged at each scale.

    The batch is reflect-padded at the bottom and right to a multiple of ``SIZE_MULTIPLE``: then every
    window's feature grid is the same lattice of the scene, and logits upsample by exactly the output
    stride, whatever the window's size (edge tiles, whole images), so tiles agree where they meet.

    ``model``: a module, or any forward pass (``models.runtime``) with its ``device`` given.
    """
    if device is None:
        assert isinstance(model, nn.Module), "a forward pass that is not a module needs its device"
        device = next(model.parameters()).device
    height, width = batch.shape[-2:]
    batch = _pad_to_multiple(batch.to(device), SIZE_MULTIPLE)
    padded = batch.shape[-2:]
    views = tta_views(tta)
    fused: torch.Tensor | None = None
    with autocast_for(device, amp):
        for scale in scales:
            scaled = batch
            if scale != 1.0:
                size = (max(1, round(padded[0] * scale)), max(1, round(padded[1] * scale)))
                scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            # views of the padded window: flipping keeps it a multiple of SIZE_MULTIPLE on the scene lattice
            logits = torch.stack([_unview(model(_view(scaled, v)).float(), v) for v in views]).mean(0)
            if scale != 1.0:
                logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
            if fused is None:
                fused = logits
            elif fuse == "max":
                fused = torch.maximum(fused, logits)
            else:
                fused = fused + logits
    assert fused is not None
    if fuse == "mean":
        fused = fused / len(scales)
    return torch.softmax(fused[..., :height, :width], dim=1)


def padded_size(side: int) -> int:
    """A window side as the model sees it: rounded up to ``SIZE_MULTIPLE``."""
    return -(-side // SIZE_MULTIPLE) * SIZE_MULTIPLE


def _pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = batch.shape[-2:]
    extra_rows, extra_cols = -height % multiple, -width % multiple
    if not extra_rows and not extra_cols:
        return batch
    mode = "reflect" if extra_rows < height and extra_cols < width else "replicate"
    return F.pad(batch, (0, extra_cols, 0, extra_rows), mode=mode)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def check_image_fits(path: object, image: np.ndarray, metadata: CheckpointMetadata) -> None:
    """An image must have the checkpoint's band count; a clear error names the file otherwise."""
    if image.shape[0] != metadata.num_bands:
        names = ", ".join(b.name for b in metadata.bands)
        raise DataError(
            f"{path}: has {image.shape[0]} band(s) but the model expects {metadata.num_bands} ({names})"
        )


def predict_image(
    model: nn.Module,
    metadata: CheckpointMetadata,
    image: np.ndarray,
    multiscale: InputScales | None = None,
    tta: str = "none",
) -> np.ndarray:
    """Class probabilities (classes, H, W) float32 for one whole (bands, H, W) image, at ``multiscale``'s
    scales (None: 1 alone)."""
    batch = normalise(image, metadata.bands)[None]
    multiscale = multiscale or InputScales()
    probabilities = predict_probabilities(model, batch, multiscale.scales, multiscale.fuse, tta=tta)
    return probabilities[0].cpu().numpy()
