"""A tiny member of the DeepLab family for tests and smoke checks: three strided convolutions down to the
output stride and a DeepLab-v2 atrous head (rates 1/2/3), any bands and classes, a few thousand weights.

It is a real architecture (built, saved, loaded, exported and tiled like the others), so every test of the
plumbing (ids, locks, refusals, kills and resume, manifests, outputs) runs the engine's own code paths with
a model that costs milliseconds per window instead of the zoo's hundreds. Without image pooling, its tiles
stitch exactly. Its numbers mean nothing until it is trained: tests of results use the zoo's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from models.deeplab import DeepLab
from models.heads import ASPPv2

TINY_RATES = (1, 2, 3)
TINY_CHANNELS = 16


class TinyBackbone(nn.Module):
    """3x3 convolutions with stride 2 (with a stride-1 one at stride 16, where a stride-8 net stops)."""

    def __init__(self, in_channels: int, output_stride: int) -> None:
        super().__init__()
        widths = (8, 12, TINY_CHANNELS)
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = width
            if index == len(widths) - 1 and output_stride == 16:
                layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.features(x)}


def build_tiny(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
    """``pretrained`` is accepted for the registry's signature: there are no pretrained weights to load."""
    return DeepLab(
        TinyBackbone(in_channels, output_stride), ASPPv2(TINY_CHANNELS, num_classes, TINY_RATES, None)
    )


def max_tiny_rate(output_stride: int) -> int:
    return max(TINY_RATES)
