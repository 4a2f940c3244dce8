"""DeepLab-v2 ASPP head (summed branch scores) and, with one branch, the LargeFOV head."""

from __future__ import annotations

import torch
from torch import nn


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP: one fc6/fc7/fc8 branch per atrous rate; the branches' class scores are summed.

    No image pooling, so a prediction depends only on its receptive field (tiles stitch exactly).
    """

    def __init__(
        self, in_channels: int, num_classes: int, rates: tuple[int, ...], hidden: int | None = 1024
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_branch(in_channels, num_classes, rate, hidden) for rate in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.branches[0](x)
        for branch in self.branches[1:]:
            scores = scores + branch(x)
        return scores


def _branch(in_channels: int, num_classes: int, rate: int, hidden: int | None) -> nn.Module:
    """VGG-style fc6(atrous 3x3)/fc7/fc8 branch, or a single atrous 3x3 scoring conv (ResNet-101 v2)."""
    if hidden is None:
        return nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.5),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.5),
        nn.Conv2d(hidden, num_classes, 1),
    )
