"""Shared surgery on backbones: atrous output stride and input-band adaptation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def apply_output_stride(blocks: Iterable[nn.Module], output_stride: int, stride_before: int) -> None:
    """Turn strided blocks into atrous ones once ``output_stride`` is reached (the DeepLab trick).

    ``blocks`` are visited in forward order; each strided block past the target stride loses its stride and
    it and every later block get their spatial convolutions dilated by the accumulated factor, so the
    receptive field grows as if the network still downsampled.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    current_stride, dilation = stride_before, 1
    for block in blocks:
        strided = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.stride[0] > 1]
        if strided:
            factor = strided[0].stride[0]
            if current_stride >= output_stride:
                dilation *= factor
                for conv in strided:
                    conv.stride = (1, 1)
            else:
                current_stride *= factor
        if dilation > 1:
            for module in block.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                    module.dilation = (dilation, dilation)
                    module.padding = (dilation * (module.kernel_size[0] - 1) // 2,) * 2


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map RGB filters onto ``in_channels`` bands, rescaled so activations keep their magnitude.

    Extra bands (e.g. NIR) get the mean RGB filter; fewer bands share the mean filter.
    """
    rgb = weight.shape[1]
    if in_channels == rgb:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    if in_channels < rgb:
        return mean.repeat(1, in_channels, 1, 1) * (rgb / in_channels)
    return torch.cat([weight, mean.repeat(1, in_channels - rgb, 1, 1)], dim=1) * (rgb / in_channels)


def replace_first_conv(module: nn.Module, in_channels: int) -> None:
    """Give ``module``'s first convolution ``in_channels`` inputs, keeping (adapted) weights."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                    bias=child.bias is not None,
                )
                with torch.no_grad():
                    new.weight.copy_(adapt_first_conv_weight(child.weight, in_channels))
                    if child.bias is not None and new.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, name, new)
                return
    raise ValueError("module has no convolution to adapt")
