"""Classical H&E labels: colour deconvolution (Ruifrok & Johnston 2001) and thresholds.

These are *not* manual annotations: glass / eosin-dominant tissue / haematoxylin-dense (nuclei-rich)
pixels, from stain optical densities. They let the project train and test a slide model on real H&E
where no licensed labels exist; a model trained on them reproduces this classical method, nothing more.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB, as Ruifrok & Johnston give them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
STAIN_CLASSES = ("background", "stroma", "nuclei")
STAIN_COLOURS = ("#f0f0f0", "#e377c2", "#3b1f8f")
GLASS_DENSITY = 0.12  # mean optical density below which a pixel is unstained (glass or an empty lumen)


def separate_stains(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (h, w, 3) float32 stain densities (H, E, DAB), >= 0."""
    optical = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    return np.asarray(np.maximum(optical @ HED_FROM_RGB, 0.0), dtype=np.float32)


def stain_labels(rgb: np.ndarray, tissue: np.ndarray, nuclei_threshold: float) -> np.ndarray:
    """0 background (glass, lumens), 1 stroma (stained tissue), 2 nuclei (haematoxylin above the threshold).

    ``tissue`` is the coarse tissue region (holes filled); inside it, unstained pixels are background too.
    """
    optical = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).mean(axis=2)
    tissue = tissue & (optical > GLASS_DENSITY)
    haematoxylin = separate_stains(rgb)[..., 0]
    nuclei = ndimage.binary_opening(tissue & (haematoxylin > nuclei_threshold), iterations=1)
    labels = np.where(tissue, 1, 0).astype(np.uint8)
    labels[nuclei] = 2
    return labels
