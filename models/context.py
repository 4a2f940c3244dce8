"""Scene-level image pooling for DeepLab-v3: one pooled feature vector per scene, given to every window.

DeepLab-v3's image-pooling branch averages the backbone's features over whatever it is shown, so a tiled
scene gets a different pooled vector per window and the tiles disagree where they meet. Averaging the
features over the whole scene first (each core's own cells, seen with its halo) and feeding that one vector
to every window makes the branch the same everywhere, as in a whole-image pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPPPooling


def pooling_layers(model: nn.Module) -> list[nn.Module]:
    """The averaging layer of every image-pooling branch, in module order (empty for v2 / LargeFOV)."""
    return [branch[0] for branch in model.modules() if isinstance(branch, ASPPPooling)]


@contextmanager
def fixed_context(model: nn.Module, vectors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside: each pooling layer returns its given (channels,) vector instead of its window's average.

    ``vectors``: one per pooling layer, e.g. the rows of a (branches, channels) tensor."""
    layers = pooling_layers(model)
    if len(layers) != len(vectors):
        raise ValueError(f"{len(vectors)} context vector(s) given for {len(layers)} pooling branch(es)")

    def replace(
        vector: torch.Tensor,
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return vector.to(output.dtype).to(output.device).view(1, -1, 1, 1).expand_as(output)

        return hook

    handles = [layer.register_forward_hook(replace(v)) for layer, v in zip(layers, vectors, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def pooled_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside: the feature maps (N, C, h, w) each pooling layer averages are appended to the yielded list."""
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0].detach())

    handles = [layer.register_forward_pre_hook(keep) for layer in pooling_layers(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def cell_span(start: int, length: int, padded: int, cells: int) -> tuple[int, int]:
    """Feature cells [first, last) whose centres fall in pixels [start, start + length) of a padded window."""
    stride = padded / cells
    first = max(0, round(start / stride))
    last = min(cells, max(first + 1, round((start + length) / stride)))
    return first, last
