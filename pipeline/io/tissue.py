"""Tissue detection on a slide thumbnail: the valid-data mask of a whole-slide image.

Stained tissue is coloured and absorbs light; glass is bright and grey. A pixel is tissue when its
saturation is above an Otsu threshold (with a floor, so that a slide that is nearly all glass or all
tissue is not split in two arbitrary halves) and its optical density is above that of clean glass.
Pen ink (blue, green, black) and dark debris are removed, holes are filled (ink lying on tissue
and lumens stay tissue: the model classifies them) and small specks are dropped. Works on any RGB
thumbnail; the caller maps the mask to the slide's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    saturation_floor: float = 0.07  # glass with a colour cast stays below this
    density_floor: float = 0.08  # mean optical density of clean glass is ~0.02
    pen_hue_degrees: tuple[float, float] = (75.0, 255.0)  # green to blue; H&E is pink/purple (270-360, 0-30)
    pen_saturation: float = 0.25  # ink is strongly coloured, faint teal tissue-marking dye is not removed
    dark_value: float = 0.16  # black ink and debris: darker than this (0-1) and nearly grey
    dark_saturation: float = 0.35  # (dark nuclei are saturated purple and stay tissue)
    closing_px: int = 2
    min_area_fraction: float = 2e-4  # specks smaller than this share of the thumbnail are dropped


@dataclass(frozen=True)
class TissueResult:
    mask: np.ndarray  # bool (h, w): tissue
    pen: np.ndarray  # bool (h, w): what was removed as ink or debris
    saturation_threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values`` (in [0, 1])."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, saturation and value in [0, 1] of a uint8 (h, w, 3) image."""
    pixels = rgb.astype(np.float32) / 255.0
    value = pixels.max(axis=2)
    chroma = value - pixels.min(axis=2)
    saturation = np.where(value > 0, chroma / np.maximum(value, 1e-6), 0.0)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.select(
        [value == red, value == green],
        [((green - blue) / safe) % 6, (blue - red) / safe + 2],
        (red - green) / safe + 4,
    )
    return np.where(chroma > 0, hue * 60.0, 0.0), saturation, value


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the channels (Beer-Lambert with white = 255)."""
    return np.asarray(-np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=2))


def detect_tissue(rgb: np.ndarray, params: TissueParams | None = None) -> TissueResult:
    params = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    hue, saturation, value = hsv(rgb)
    threshold = max(otsu_threshold(saturation), params.saturation_floor)
    candidate = (saturation > threshold) & (optical_density(rgb) > params.density_floor)
    low, high = params.pen_hue_degrees
    ink = (hue >= low) & (hue <= high) & (saturation > params.pen_saturation)
    pen = ink | ((value < params.dark_value) & (saturation < params.dark_saturation))
    tissue = candidate & ~pen
    if params.closing_px:
        structure = ndimage.generate_binary_structure(2, 1)
        tissue = ndimage.binary_closing(tissue, structure, iterations=params.closing_px)
    # ink lying on tissue leaves a hole that is filled back: only ink on glass or at the margin is lost
    tissue = ndimage.binary_fill_holes(tissue)
    labels, count = ndimage.label(tissue)
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        keep = areas >= params.min_area_fraction * tissue.size
        keep[0] = False
        tissue = keep[labels]
    return TissueResult(np.asarray(tissue, dtype=bool), np.asarray(pen, dtype=bool), threshold)
