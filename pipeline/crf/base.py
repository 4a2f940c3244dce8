"""What every dense-CRF backend shares: the input checks, the errors, and the ``CRFBackend`` base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from deeplab_common.errors import DeepLabError
from models.metadata import CRFParams

# pydensecrf.utils.unary_from_softmax's floor: the unary -log(p) of a zero probability stays finite
UNARY_CLIP = 1e-5


class CRFError(DeepLabError):
    """Inputs the CRF cannot refine: wrong shapes or types."""


class CRFBackend(ABC):
    """One implementation of the same model: Krähenbühl & Koltun's mean field with Potts compatibility, a
    Gaussian smoothness kernel (w2, σγ) and a bilateral appearance kernel (w1, σα, σβ), intensities on the
    0-255 scale whatever the bit depth, pydensecrf's symmetric normalisation. Backends differ in speed and
    where they run, not in what they compute (their labels agree on ≥ 99.5% of pixels, tested)."""

    name: str

    def refine(
        self,
        probabilities: np.ndarray,
        image: np.ndarray,
        params: CRFParams | None = None,
        input_max: float = 255.0,
        valid: np.ndarray | None = None,
    ) -> np.ndarray:
        """Mean-field inference; returns refined marginals, (classes, H, W) float32.

        ``probabilities``: softmax output (classes, H, W); ``image``: (bands, H, W) raw values on a scale
        whose full value is ``input_max``; ``valid``: optional (H, W) bool, pixels outside it keep their
        input.
        """
        check_inputs(probabilities, image, valid)
        marginals = self.marginals(
            probabilities.astype(np.float32, copy=False), image, params or CRFParams(), input_max
        )
        if valid is not None:
            marginals = np.where(valid[None], marginals, probabilities.astype(np.float32))
        return marginals

    def refine_labels(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Refined class map (H, W) uint8: the argmax of ``refine`` (the same arguments)."""
        return self.refine(*args, **kwargs).argmax(0).astype(np.uint8)

    @abstractmethod
    def marginals(
        self, probabilities: np.ndarray, image: np.ndarray, params: CRFParams, input_max: float
    ) -> np.ndarray:
        """(classes, H, W) float32 marginals of checked inputs."""


def check_inputs(probabilities: np.ndarray, image: np.ndarray, valid: np.ndarray | None) -> None:
    if probabilities.ndim != 3:
        raise CRFError(f"probabilities must be (classes, H, W), got shape {probabilities.shape}")
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise CRFError(f"probabilities must be floating point, got {probabilities.dtype}")
    if probabilities.shape[0] < 2:
        raise CRFError("the CRF needs at least two classes")
    if image.ndim != 3:
        raise CRFError(f"image must be (bands, H, W), got shape {image.shape}")
    if image.shape[1:] != probabilities.shape[1:]:
        raise CRFError(
            f"image is {image.shape[2]}x{image.shape[1]} but probabilities are "
            f"{probabilities.shape[2]}x{probabilities.shape[1]}"
        )
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise CRFError(f"image must be numeric, got {image.dtype}")
    if not np.isfinite(probabilities).all():
        raise CRFError("probabilities contain NaN or infinite values")
    if valid is not None and valid.shape != probabilities.shape[1:]:
        raise CRFError(f"valid mask shape {valid.shape} differs from the image {probabilities.shape[1:]}")
