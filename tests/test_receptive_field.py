from __future__ import annotations

import torch
from torch import nn

from models.receptive_field import backbone_radius, receptive_radius
from pipeline.engine.grid import default_halo


def _gradient_support_radius(net: nn.Module, size: int = 65) -> int:
    """Half-width of the input area that gets a gradient from the centre output pixel (measured)."""
    image = torch.randn(1, 1, size, size, requires_grad=True)
    out = net(image)
    out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
    assert image.grad is not None
    rows = image.grad[0, 0].abs().sum(1).nonzero()
    return int((rows.max() - rows.min()).item()) // 2


def test_radius_matches_the_measured_gradient_support() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.AvgPool2d(3, 2, padding=1),  # max pooling passes a gradient to one input only
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, 5, stride=2, padding=2),
        nn.Conv2d(4, 1, 3, padding=1),
    )
    assert backbone_radius(net) == _gradient_support_radius(net)


def test_largefov_radius_and_the_default_halo() -> None:
    # VGG-16 to conv5 with pool4/pool5 at stride 1 (~113 px) plus fc6 at rate 12 x stride 8 (96 px).
    radius = receptive_radius("deeplab_largefov_vgg16", (("in_channels", 3), ("num_classes", 2)))
    assert radius == 209
    assert default_halo(radius, None, 1024) == 224  # rounded up to the 32 px lattice
    assert default_halo(radius, None, 256) == 128  # capped at half the core for models with image pooling
    assert default_halo(radius, None, 128, global_context=False) == 128  # at the core for models without
    assert default_halo(649, None, 512, global_context=False) == 512
    assert default_halo(10, 20.0, 512) == 64  # the CRF's 3 σα when it reaches further
