"""The DeepLab segmentation model: a feature extractor, an atrous classifier head, optional v3+ decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DeepLab(nn.Module):
    """Backbone (dict with ``"out"``, and ``"low"`` for a decoder) + head; logits come back at input size.

    Parameter names (``backbone.*``, ``classifier.*``) match torchvision's DeepLab-v3 models so that their
    state dicts load unchanged.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        scores = self.classifier(features["out"])
        if self.decoder is not None:
            scores = self.decoder(features["low"], scores)
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


class V3PlusDecoder(nn.Module):
    """DeepLab-v3+ decoder: sharpen stride-16 ASPP features with stride-4 low-level features."""

    def __init__(self, low_channels: int, aspp_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True)
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(aspp_channels + 48, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, low: torch.Tensor, aspp: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.reduce(low), upsampled], dim=1))
