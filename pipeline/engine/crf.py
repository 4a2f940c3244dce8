"""Fully connected CRF refinement (Krähenbühl & Koltun, as used by DeepLab), via pydensecrf2.

Potts compatibility; a Gaussian smoothness kernel (w2, σγ) and a bilateral appearance kernel (w1, σα, σβ).
3-band uint8 imagery takes the library's RGB fast path; any other band count or bit depth takes the
multi-band bilateral kernel, with intensities first mapped to the 0-255 scale so that σβ means the same
thing for every bit depth.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_softmax

from models.errors import DeepLabError
from models.metadata import CRFParams

__all__ = ["CRFError", "CRFParams", "refine", "refine_labels"]


class CRFError(DeepLabError):
    """Inputs the CRF cannot refine: wrong shapes or types."""


def refine(
    probabilities: np.ndarray,
    image: np.ndarray,
    params: CRFParams | None = None,
    input_max: float = 255.0,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Mean-field inference; returns refined marginals, (classes, H, W) float32.

    ``probabilities``: softmax output (classes, H, W); ``image``: (bands, H, W) raw values on a scale whose
    full value is ``input_max``; ``valid``: optional (H, W) bool, pixels outside it keep their input.
    """
    params = params or CRFParams()
    _check(probabilities, image, valid)
    classes, height, width = probabilities.shape
    unary = np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32, copy=False)))
    if image.shape[0] == 3 and image.dtype == np.uint8:
        crf = dcrf.DenseCRF2D(width, height, classes)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=params.w2)
        # pydensecrf takes a writable buffer; a window from Ray's object store is read-only, and for a
        # 1-pixel-wide window moveaxis returns that same buffer (already contiguous) instead of a copy
        rgb = np.require(np.moveaxis(image, 0, -1), requirements=["C_CONTIGUOUS", "WRITEABLE"])
        crf.addPairwiseBilateral(sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=rgb, compat=params.w1)
    else:
        crf = dcrf.DenseCRF(height * width, classes)
        crf.setUnaryEnergy(unary)
        smooth = create_pairwise_gaussian(
            sdims=(params.sigma_gamma, params.sigma_gamma), shape=(height, width)
        )
        crf.addPairwiseEnergy(np.ascontiguousarray(smooth, dtype=np.float32), compat=params.w2)
        scaled = image.astype(np.float32) * np.float32(255.0 / input_max)
        appearance = create_pairwise_bilateral(
            sdims=(params.sigma_alpha, params.sigma_alpha),
            schan=(params.sigma_beta,) * image.shape[0],
            img=scaled,
            chdim=0,
        )
        crf.addPairwiseEnergy(np.ascontiguousarray(appearance, dtype=np.float32), compat=params.w1)
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(classes, height, width)
    if valid is not None:
        marginals = np.where(valid[None], marginals, probabilities.astype(np.float32))
    return marginals


def refine_labels(
    probabilities: np.ndarray,
    image: np.ndarray,
    params: CRFParams | None = None,
    input_max: float = 255.0,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Refined class map (H, W) uint8."""
    return refine(probabilities, image, params, input_max, valid).argmax(0).astype(np.uint8)


def _check(probabilities: np.ndarray, image: np.ndarray, valid: np.ndarray | None) -> None:
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
