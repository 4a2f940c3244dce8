"""The inference preparation of every model in the family: BatchNorm folded, channels last, same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPPPooling

from models.context import fixed_context, pooling_layers
from models.optimize import for_inference
from models.registry import ARCHITECTURES, build_model


def _with_real_statistics(model: nn.Module) -> nn.Module:
    """Fresh BatchNorm layers are the identity; statistics like a trained model's make folding matter."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _in_pooling_branches(model: nn.Module) -> int:
    return sum(_batchnorms(m) for m in model.modules() if isinstance(m, ASPPPooling))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_folded_channels_last_model_gives_the_same_outputs(architecture: str) -> None:
    torch.manual_seed(0)
    model = _with_real_statistics(build_model(architecture, num_classes=3, in_channels=4))
    fast = for_inference(model)
    batch = torch.randn(2, 4, 96, 128)
    with torch.inference_mode():
        expected, got = model(batch), fast(batch)
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * float(expected.abs().max())}
    torch.testing.assert_close(got, expected, **tolerance)
    # folded everywhere but inside the image-pooling branches, which stay whole modules for models.context
    assert _batchnorms(fast) == _in_pooling_branches(model) < _batchnorms(model) or _batchnorms(model) == 0
    assert len(pooling_layers(fast)) == len(pooling_layers(model))
    if pooling_layers(model):  # the scene-context hook reaches the fast model's pooling branch too
        branch = next(m for m in model.modules() if isinstance(m, ASPPPooling))
        vector = [torch.randn(branch[1].in_channels)]
        with torch.inference_mode(), fixed_context(model, vector), fixed_context(fast, vector):
            torch.testing.assert_close(fast(batch), model(batch), **tolerance)
            assert not torch.allclose(model(batch), expected, **tolerance)  # the vector was used
