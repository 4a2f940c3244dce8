"""The DeepLab model family: one builder per architecture name, listed by ``deeplab models``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50, resnet101, vgg16
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from deeplab_common.errors import CheckpointError, ConfigError
from models.deeplab import DeepLab, V3PlusDecoder
from models.efficientnet_lite import LITE_VARIANTS, EfficientNetLiteFeatures, load_imagenet
from models.heads import ASPPv2
from models.layers import apply_output_stride, replace_first_conv
from models.tiny import build_tiny, max_tiny_rate

PRETRAINED_CHOICES = ("none", "imagenet")


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    build: Callable[[int, int, int, str], nn.Module]  # (num_classes, in_channels, output_stride, pretrained)
    default_output_stride: int
    imagenet_normalisation: tuple[tuple[float, ...], tuple[float, ...]]  # mean, std on the 0-255 scale
    head_rate: Callable[[int], int]  # largest atrous rate of the head at an output stride
    # An image-pooling branch: every prediction depends on the whole window, so no halo makes tiles exact.
    global_context: bool = True

    def head_reach(self, output_stride: int | None = None) -> int:
        """Half-width in input pixels of the atrous head's field of view (largest rate x output stride)."""
        stride = output_stride or self.default_output_stride
        return self.head_rate(stride) * stride


_IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
_LITE = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))  # EfficientNet-Lite was trained on (x - 127) / 128


def _v3_rates(output_stride: int) -> tuple[int, int, int]:
    return (12, 24, 36) if output_stride == 8 else (6, 12, 18)


def _v2_rates(output_stride: int) -> tuple[int, int, int, int]:
    return (6, 12, 18, 24) if output_stride == 8 else (3, 6, 9, 12)


def _largefov_rate(output_stride: int) -> int:
    return 12 if output_stride == 8 else 6  # the same field of view at either stride


def _max_v3_rate(output_stride: int) -> int:
    return max(_v3_rates(output_stride))


_MOBILENET_RATES = (12, 24, 36)


def _max_mobilenet_rate(output_stride: int) -> int:
    return max(_MOBILENET_RATES)


def _max_v2_rate(output_stride: int) -> int:
    return max(_v2_rates(output_stride))


def _resnet_dilation(output_stride: int) -> list[bool]:
    if output_stride == 8:
        return [False, True, True]
    if output_stride == 16:
        return [False, False, True]
    raise ConfigError(f"ResNet backbones support output stride 8 or 16, not {output_stride}")


def _torchvision_weights(enum_name: str, pretrained: str) -> Any:
    """ImageNet weights from torchvision's cache (a user with a network gets them downloaded)."""
    if pretrained == "none":
        return None
    import torchvision.models as tvm

    return getattr(tvm, enum_name).IMAGENET1K_V1


def _load_or_explain(build: Callable[[], nn.Module], what: str) -> nn.Module:
    try:
        return build()
    except OSError as exc:  # URLError is an OSError: no network and nothing in the torch cache
        raise CheckpointError(
            f"ImageNet weights for {what} are not in the torch cache ({torch.hub.get_dir()}/checkpoints) "
            f"and cannot be downloaded here: {exc}. Use --pretrained none or copy the file there."
        ) from exc


def _build_resnet_v3(depth: int) -> Callable[[int, int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
        factory = resnet50 if depth == 50 else resnet101
        weights = _torchvision_weights(f"ResNet{depth}_Weights", pretrained)
        net = _load_or_explain(
            lambda: factory(weights=weights, replace_stride_with_dilation=_resnet_dilation(output_stride)),
            f"ResNet-{depth}",
        )
        replace_first_conv(net, in_channels)
        backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})
        return DeepLab(backbone, DeepLabHead(2048, num_classes, _v3_rates(output_stride)))

    return build


def _build_resnet101_v2(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
    weights = _torchvision_weights("ResNet101_Weights", pretrained)
    net = _load_or_explain(
        lambda: resnet101(weights=weights, replace_stride_with_dilation=_resnet_dilation(output_stride)),
        "ResNet-101",
    )
    replace_first_conv(net, in_channels)
    backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})
    # The paper's rates are for output stride 8; halve them at 16 to keep the same field of view.
    rates = _v2_rates(output_stride)
    return DeepLab(backbone, ASPPv2(2048, num_classes, rates, hidden=None))


def _build_mobilenet_v3(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
    weights = _torchvision_weights("MobileNet_V3_Large_Weights", pretrained)
    net = _load_or_explain(lambda: mobilenet_v3_large(weights=weights, dilated=False), "MobileNetV3-Large")
    features = cast(nn.Sequential, net.features)
    apply_output_stride(list(features)[1:], output_stride, stride_before=2)
    replace_first_conv(features, in_channels)
    backbone = IntermediateLayerGetter(features, return_layers={"3": "low", str(len(features) - 1): "out"})
    # torchvision uses rates 12/24/36 here at output stride 16; keep them so its weights behave alike.
    return DeepLab(backbone, DeepLabHead(960, num_classes, _MOBILENET_RATES))


class _VGGLargeFOVBackbone(nn.Module):
    """VGG-16 conv layers with pool4/pool5 at stride 1 (3x3, pad 1) and atrous conv5, as in DeepLab-v1/v2."""

    def __init__(self, features: nn.Sequential, output_stride: int) -> None:
        super().__init__()
        pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        keep_strided = 3 if output_stride == 8 else 4
        for order, index in enumerate(pools):
            stride = 2 if order < keep_strided else 1
            features[index] = nn.MaxPool2d(3, stride=stride, padding=1)
        conv5_dilation = 2 if output_stride == 8 else 1
        for layer in list(features)[pools[3] + 1 : pools[4]]:
            if isinstance(layer, nn.Conv2d):
                layer.dilation = (conv5_dilation, conv5_dilation)
                layer.padding = (conv5_dilation, conv5_dilation)
        self.features = features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.features(x)}


def _build_vgg16_largefov(
    num_classes: int, in_channels: int, output_stride: int, pretrained: str
) -> nn.Module:
    weights = _torchvision_weights("VGG16_Weights", pretrained)
    net = _load_or_explain(lambda: vgg16(weights=weights), "VGG-16")
    features = cast(nn.Sequential, net.features)
    replace_first_conv(features, in_channels)
    backbone = _VGGLargeFOVBackbone(features, output_stride)
    rate = _largefov_rate(output_stride)
    return DeepLab(backbone, ASPPv2(512, num_classes, (rate,)))


def _lite_features(
    variant_name: str, in_channels: int, output_stride: int, pretrained: str
) -> EfficientNetLiteFeatures:
    features = EfficientNetLiteFeatures(LITE_VARIANTS[variant_name], in_channels, output_stride)
    if pretrained == "imagenet":
        load_imagenet(features)
    return features


def _build_lite(variant_name: str, decoder: bool) -> Callable[[int, int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
        features = _lite_features(variant_name, in_channels, output_stride, pretrained)
        out_channels = features.variant.out_channels
        rates = _v3_rates(output_stride)
        if decoder:
            return DeepLab(
                features,
                ASPP(out_channels, list(rates)),
                # A 128-channel decoder: a third of the 256-channel one's cost on CPU, for the compact model.
                V3PlusDecoder(features.variant.low_level_channels, 256, num_classes, channels=128),
            )
        return DeepLab(features, DeepLabHead(out_channels, num_classes, rates))

    return build


def _build_lite_v2(num_classes: int, in_channels: int, output_stride: int, pretrained: str) -> nn.Module:
    """DeepLab-v2 ASPP on the compact backbone: no image pooling, so tiles stitch exactly (a trainable v2)."""
    features = _lite_features("lite0", in_channels, output_stride, pretrained)
    rates = _v2_rates(output_stride)
    return DeepLab(features, ASPPv2(features.variant.out_channels, num_classes, rates, hidden=None))


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "deeplabv3_resnet50",
            "DeepLab-v3, ResNet-50, ASPP + image pooling",
            _build_resnet_v3(50),
            8,
            _IMAGENET,
            _max_v3_rate,
        ),
        Architecture(
            "deeplabv3_resnet101",
            "DeepLab-v3, ResNet-101, ASPP + image pooling",
            _build_resnet_v3(101),
            8,
            _IMAGENET,
            _max_v3_rate,
        ),
        Architecture(
            "deeplabv3_mobilenet_v3_large",
            "DeepLab-v3, MobileNetV3-Large, ASPP + image pooling",
            _build_mobilenet_v3,
            16,
            _IMAGENET,
            _max_mobilenet_rate,
        ),
        Architecture(
            "deeplabv2_resnet101",
            "DeepLab-v2, ResNet-101, ASPP rates 6/12/18/24 (summed scores)",
            _build_resnet101_v2,
            8,
            _IMAGENET,
            _max_v2_rate,
            global_context=False,
        ),
        Architecture(
            "deeplab_largefov_vgg16",
            "DeepLab-LargeFOV, VGG-16, atrous fc6 (rate 12)",
            _build_vgg16_largefov,
            8,
            _IMAGENET,
            _largefov_rate,
            global_context=False,
        ),
        Architecture(
            "deeplabv2_efficientnet_lite0",
            "DeepLab-v2, EfficientNet-Lite0 (ImageNet weights shipped), ASPP 6/12/18/24 (summed scores)",
            _build_lite_v2,
            16,
            _LITE,
            _max_v2_rate,
            global_context=False,
        ),
        Architecture(
            "deeplabv3_efficientnet_lite0",
            "DeepLab-v3, EfficientNet-Lite0 (ImageNet weights shipped), ASPP",
            _build_lite("lite0", decoder=False),
            16,
            _LITE,
            _max_v3_rate,
        ),
        Architecture(
            "deeplabv3plus_efficientnet_lite0",
            "DeepLab-v3+, EfficientNet-Lite0 (ImageNet weights shipped), ASPP + decoder",
            _build_lite("lite0", decoder=True),
            16,
            _LITE,
            _max_v3_rate,
        ),
        Architecture(
            "deeplabv2_tiny",
            "DeepLab-v2 on three convolutions: a tiny model for tests and smoke checks (no weights shipped)",
            build_tiny,
            8,
            _LITE,
            max_tiny_rate,
            global_context=False,
        ),
        Architecture(
            "deeplabv3plus_efficientnet_lite2",
            "DeepLab-v3+, EfficientNet-Lite2 (ImageNet weights shipped), ASPP + decoder",
            _build_lite("lite2", decoder=True),
            16,
            _LITE,
            _max_v3_rate,
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; known: {known}") from None


def build_model(
    architecture: str,
    num_classes: int,
    in_channels: int = 3,
    output_stride: int | None = None,
    pretrained: str = "none",
) -> nn.Module:
    """Build a member of the family; ``pretrained='imagenet'`` loads backbone weights where available."""
    arch = get_architecture(architecture)
    if pretrained not in PRETRAINED_CHOICES:
        raise ConfigError(f"pretrained must be one of {PRETRAINED_CHOICES}, not {pretrained!r}")
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be positive (got {num_classes}, {in_channels})")
    stride = output_stride or arch.default_output_stride
    if stride not in (8, 16):
        raise ConfigError(f"output stride must be 8 or 16, not {stride}")
    return arch.build(num_classes, in_channels, stride, pretrained)
