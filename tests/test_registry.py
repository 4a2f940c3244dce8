from __future__ import annotations

import pytest
import torch

from deeplab_common.errors import ConfigError
from models.efficientnet_lite import LITE_VARIANTS, EfficientNetLiteFeatures, load_imagenet, pretrained_path
from models.registry import ARCHITECTURES, build_model
from pipeline.cli import main


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_model_builds_and_runs_on_1_3_4_6_bands(architecture: str) -> None:
    for bands in (1, 3, 4, 6):
        model = build_model(architecture, num_classes=5, in_channels=bands).eval()
        with torch.inference_mode():
            logits = model(torch.randn(1, bands, 72, 88))
        assert logits.shape == (1, 5, 72, 88), (architecture, bands)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "architecture",
    [
        "deeplabv3_mobilenet_v3_large",
        "deeplabv3_efficientnet_lite0",
        "deeplab_largefov_vgg16",
        "deeplabv3_resnet50",
        "deeplabv2_tiny",
    ],
)
def test_output_stride_8_and_16(architecture: str) -> None:
    sizes = {}
    for stride in (8, 16):
        model = build_model(architecture, num_classes=2, output_stride=stride).eval()
        features = model.backbone(torch.randn(1, 3, 128, 128))["out"]
        sizes[stride] = features.shape[-1]
    assert sizes == {8: 16, 16: 8}


def test_lite0_imagenet_weights_load_and_adapt_to_nir() -> None:
    plain = build_model("deeplabv3_efficientnet_lite0", 2, 3, pretrained="none")
    rgb = build_model("deeplabv3_efficientnet_lite0", 2, 3, pretrained="imagenet")
    rgbn = build_model("deeplabv3_efficientnet_lite0", 2, 4, pretrained="imagenet")
    stem_rgb = rgb.backbone._conv_stem.weight
    assert not torch.equal(stem_rgb, plain.backbone._conv_stem.weight)
    stem_rgbn = rgbn.backbone._conv_stem.weight
    assert stem_rgbn.shape[1] == 4
    # RGB filters are kept (rescaled by 3/4) and the NIR filter is their mean.
    torch.testing.assert_close(stem_rgbn[:, :3], stem_rgb * 0.75)
    torch.testing.assert_close(stem_rgbn[:, 3], stem_rgb.mean(1) * 0.75)


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_every_lite_variant_takes_all_of_its_imagenet_backbone(variant: str) -> None:
    features = EfficientNetLiteFeatures(LITE_VARIANTS[variant])
    load_imagenet(features)
    shipped = torch.load(pretrained_path(features.variant), map_location="cpu", weights_only=True)
    for key, tensor in features.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, shipped[key]), key
    # Only the classifier's head conv, its BN and the fully connected layer are left out.
    left_out = {key.split(".")[0] for key in shipped if key not in features.state_dict()}
    assert left_out == {"_conv_head", "_bn1", "_fc"}


def test_unknown_architecture_and_bad_stride_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model("deeplabv9", 2)
    with pytest.raises(ConfigError, match="output stride"):
        build_model("deeplabv3_resnet50", 2, output_stride=4)


def test_cli_lists_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ARCHITECTURES:
        assert name in out
