"""The pydensecrf2 backend: Krähenbühl & Koltun's C++ lattice, one CPU core per call.

3-band uint8 imagery takes the library's RGB fast path; any other band count or bit depth takes the
multi-band bilateral kernel, with intensities first mapped to the 0-255 scale so that σβ means the same
thing for every bit depth.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_softmax

from models.metadata import CRFParams
from pipeline.crf.base import UNARY_CLIP, CRFBackend


class PyDenseCRF(CRFBackend):
    name = "pydensecrf"

    def marginals(
        self, probabilities: np.ndarray, image: np.ndarray, params: CRFParams, input_max: float
    ) -> np.ndarray:
        classes, height, width = probabilities.shape
        unary = np.ascontiguousarray(unary_from_softmax(probabilities, clip=UNARY_CLIP))
        if image.shape[0] == 3 and image.dtype == np.uint8:
            crf = dcrf.DenseCRF2D(width, height, classes)
            crf.setUnaryEnergy(unary)
            crf.addPairwiseGaussian(sxy=params.sigma_gamma, compat=params.w2)
            # pydensecrf takes a writable buffer; a window from Ray's object store is read-only, and for a
            # 1-pixel-wide window moveaxis returns that same buffer (already contiguous) instead of a copy
            rgb = np.require(np.moveaxis(image, 0, -1), requirements=["C_CONTIGUOUS", "WRITEABLE"])
            crf.addPairwiseBilateral(
                sxy=params.sigma_alpha, srgb=params.sigma_beta, rgbim=rgb, compat=params.w1
            )
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
        return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(classes, height, width)
