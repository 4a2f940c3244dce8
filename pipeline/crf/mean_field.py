"""The torch backend: mean field on the permutohedral lattice, one code path for CPU and CUDA, batched.

A batch of windows (any sizes, one class count) shares one lattice per kernel: their pixels carry the
window's index as a lattice coordinate that no blur step crosses, so each is refined as if alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.metadata import CRFParams
from pipeline.crf.base import UNARY_CLIP, CRFBackend, CRFError
from pipeline.crf.lattice import Permutohedral

# pydensecrf's guard against a zero filter response in the symmetric normalisation
_NORM_EPSILON = 1e-20


class TorchCRF(CRFBackend):
    name = "torch"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def marginals(
        self, probabilities: np.ndarray, image: np.ndarray, params: CRFParams, input_max: float
    ) -> np.ndarray:
        refined = self.refine_tensors(
            [torch.from_numpy(probabilities)],
            [torch.from_numpy(np.ascontiguousarray(image))],
            params,
            input_max,
        )
        return refined[0].cpu().numpy()

    @torch.inference_mode()
    def refine_tensors(
        self,
        probabilities: Sequence[torch.Tensor],
        images: Sequence[torch.Tensor],
        params: CRFParams,
        input_max: float,
    ) -> list[torch.Tensor]:
        """Marginals (classes, h, w) float32 of each window, on this backend's device. ``probabilities[i]``:
        (classes, h, w); ``images[i]``: (bands, h, w) raw values whose full scale is ``input_max``."""
        if not probabilities:
            return []
        classes = probabilities[0].shape[0]
        if any(p.shape[0] != classes for p in probabilities):
            raise CRFError("windows refined together must have one class count")
        shapes = [tuple(p.shape[1:]) for p in probabilities]
        flat = torch.cat(
            [p.to(self.device, torch.float32).reshape(classes, -1) for p in probabilities], 1
        ).t()
        unary = -torch.log(flat.clamp(UNARY_CLIP, 1.0))  # (N, classes)
        kernels = [
            (weight, _Kernel(features, groups))
            for weight, features, groups in _features(shapes, images, params, input_max, self.device)
            if weight > 0
        ]
        marginal = torch.softmax(-unary, dim=1)
        for _ in range(params.iterations):
            energy = -unary
            for weight, kernel in kernels:
                # Potts: a label's energy at a pixel falls with the kernel-weighted mass of that label nearby
                energy = energy + weight * kernel.apply(marginal)
            marginal = torch.softmax(energy, dim=1)
        sizes = [h * w for h, w in shapes]
        return [
            part.t().reshape(classes, h, w)
            for part, (h, w) in zip(torch.split(marginal, sizes), shapes, strict=True)
        ]


class _Kernel:
    """One Gaussian kernel with pydensecrf's symmetric normalisation: D^-1/2 K D^-1/2, D = K·1."""

    def __init__(self, features: torch.Tensor, groups: torch.Tensor) -> None:
        self.lattice = Permutohedral(features, groups)
        ones = features.new_ones((features.shape[0], 1))
        self.norm = torch.rsqrt(self.lattice.filter(ones) + _NORM_EPSILON)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return self.lattice.filter(values * self.norm) * self.norm


def _features(
    shapes: list[tuple[int, ...]],
    images: Sequence[torch.Tensor],
    params: CRFParams,
    input_max: float,
    device: torch.device,
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(weight, features (N, d), window index (N,)) of the smoothness and the appearance kernel: positions
    (x, y) in pixels over σ, then intensities on the 0-255 scale over σβ (pydensecrf's order for RGB)."""
    positions, intensities, groups = [], [], []
    for index, ((height, width), image) in enumerate(zip(shapes, images, strict=True)):
        if tuple(image.shape[1:]) != (height, width):
            raise CRFError(f"image {tuple(image.shape)} does not match its probabilities ({height}x{width})")
        rows, cols = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        positions.append(torch.stack([cols.reshape(-1), rows.reshape(-1)], 1))
        scaled = image.to(device, torch.float32).reshape(image.shape[0], -1).t() * (255.0 / input_max)
        intensities.append(scaled)
        groups.append(torch.full((height * width,), index, dtype=torch.int64, device=device))
    position = torch.cat(positions)
    group = torch.cat(groups)
    appearance = torch.cat([position / params.sigma_alpha, torch.cat(intensities) / params.sigma_beta], 1)
    return [(params.w2, position / params.sigma_gamma, group), (params.w1, appearance, group)]
