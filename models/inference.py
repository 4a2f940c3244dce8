"""From raw pixels to class probabilities with a loaded checkpoint: normalisation and the forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import DataError
from models.metadata import BandInfo, CheckpointMetadata


def normalise(image: np.ndarray, bands: Sequence[BandInfo]) -> torch.Tensor:
    """(bands, H, W) raw values -> float32 tensor ``(value - mean) / std`` per band."""
    mean = torch.tensor([b.mean for b in bands], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor([b.std for b in bands], dtype=torch.float32).view(-1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(image)).float() - mean) / std


def autocast_for(device: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision on CUDA only: bf16 autocast is slower than fp32 on the CPUs we measured."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    batch: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    fuse: str = "max",
    amp: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (N, classes, H, W) for a normalised batch; scales are fused as in the paper."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    height, width = batch.shape[-2:]
    fused: torch.Tensor | None = None
    with autocast_for(device, amp):
        for scale in scales:
            scaled = batch
            if scale != 1.0:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            logits = model(scaled).float()
            if scale != 1.0:
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            if fused is None:
                fused = logits
            elif fuse == "max":
                fused = torch.maximum(fused, logits)
            else:
                fused = fused + logits
    assert fused is not None
    if fuse == "mean":
        fused = fused / len(scales)
    return torch.softmax(fused, dim=1)


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
    model: nn.Module, metadata: CheckpointMetadata, image: np.ndarray, scales: Sequence[float] = (1.0,)
) -> np.ndarray:
    """Class probabilities (classes, H, W) float32 for one whole (bands, H, W) image."""
    batch = normalise(image, metadata.bands)[None]
    return predict_probabilities(model, batch, scales=scales)[0].cpu().numpy()
