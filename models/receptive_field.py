"""Theoretical receptive field of a backbone, from its convolutions and poolings in forward order.

radius += (kernel - 1) * dilation * jump / 2 per layer, jump *= stride: the textbook recursion. Parallel
1x1 strided shortcuts (ResNet's ``downsample``) are skipped so strides are not counted twice; pointwise
convolutions add nothing. The large-scene engine derives its default tile halo from this and the head's reach.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from torch import nn


def backbone_radius(backbone: nn.Module) -> int:
    radius, jump = 0.0, 1
    for name, module in backbone.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            kernel = _first(module.kernel_size)
            stride = _first(module.stride)
            dilation = _first(getattr(module, "dilation", 1))
            radius += (kernel - 1) * dilation * jump / 2
            jump *= stride
    return math.ceil(radius)  # even-sized fields (2x2 pools) have a half-pixel radius: round up


@lru_cache(maxsize=16)
def receptive_radius(architecture: str, arch_args: tuple[tuple[str, Any], ...]) -> int:
    """Backbone radius plus the atrous head's reach, in input pixels, for a registry architecture."""
    from models.registry import build_model, get_architecture

    args = dict(arch_args)
    model = build_model(architecture, **(args | {"pretrained": "none"}))
    backbone = model.get_submodule("backbone")
    return backbone_radius(backbone) + get_architecture(architecture).head_reach(args.get("output_stride"))


def _first(value: Any) -> int:
    return int(value[0] if isinstance(value, tuple) else value)
