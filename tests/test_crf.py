from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from models.data import read_image, read_mask
from models.metadata import CRFParams
from models.metrics import SegmentationMetrics
from pipeline.crf import CRFError, refine, refine_labels
from pipeline.engine.grid import Tile, core_of
from pipeline.engine.workers import CRFWorker, crf_inputs
from tests.conftest import kampala_chip

STEMS = ("OAM-1238456-1046532-21", "OAM-1238450-1046530-21", "OAM-1238452-1046529-21")


def _blurred(mask: np.ndarray) -> np.ndarray:
    """A soft, blurred building map whose boundary bleeds outwards by several pixels (as networks' do)."""
    building = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 8) + 0.25, 0, 1)
    return (0.8 * np.stack([1 - building, building]) + 0.1).astype(np.float32)


def test_crf_improves_boundary_f1_of_a_blurred_map_on_real_chips(kampala: Path) -> None:
    before = SegmentationMetrics(["background", "building"])
    after = SegmentationMetrics(["background", "building"])
    for stem in STEMS:
        image_path, mask_path = kampala_chip(kampala, stem)
        image, mask = read_image(image_path), read_mask(mask_path, 2, 255)
        probabilities = _blurred(mask)
        before.update(probabilities.argmax(0), mask)
        after.update(refine_labels(probabilities, image, CRFParams()), mask)
    assert after.boundary_f1() > before.boundary_f1() + 0.2, (before.boundary_f1(), after.boundary_f1())
    assert after.miou() > before.miou()


def test_multiband_kernel_agrees_with_the_rgb_fast_path(kampala: Path) -> None:
    image_path, mask_path = kampala_chip(kampala)
    image, mask = read_image(image_path), read_mask(mask_path, 2, 255)
    probabilities = _blurred(mask)
    rgb = refine_labels(probabilities, image)  # uint8, 3 bands: DenseCRF2D's RGB bilateral kernel
    generic = refine_labels(probabilities, image.astype(np.float32))  # create_pairwise_bilateral path
    assert (rgb == generic).mean() > 0.99


def test_sixteen_bit_and_four_band_imagery_is_refined_on_the_0_255_scale(kampala: Path) -> None:
    image_path, mask_path = kampala_chip(kampala)
    image, mask = read_image(image_path), read_mask(mask_path, 2, 255)
    probabilities = _blurred(mask)
    eight_bit = refine_labels(probabilities, image.astype(np.float32))
    sixteen_bit = refine_labels(probabilities, image.astype(np.uint16) * 257, input_max=65535.0)
    assert (eight_bit == sixteen_bit).mean() > 0.99
    four_band = np.concatenate([image, image[:1]]).astype(np.uint8)
    refined = refine(probabilities, four_band)
    assert refined.shape == probabilities.shape
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)


def test_invalid_pixels_keep_their_input() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([1, 1, 1], size=(40, 50)).transpose(2, 0, 1).astype(np.float32)
    image = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    valid = np.ones((40, 50), bool)
    valid[:, :10] = False
    refined = refine(probabilities, image, valid=valid)
    np.testing.assert_array_equal(refined[:, :, :10], probabilities[:, :, :10])


@pytest.mark.parametrize(
    ("probabilities", "image", "message"),
    [
        (np.ones((2, 10, 10), np.float32) / 2, np.zeros((3, 10, 12), np.uint8), "10x10"),
        (np.ones((2, 10, 10), np.int64), np.zeros((3, 10, 10), np.uint8), "floating point"),
        (np.ones((10, 10), np.float32), np.zeros((3, 10, 10), np.uint8), "classes, H, W"),
        (np.ones((2, 10, 10), np.float32) / 2, np.zeros((10, 10), np.uint8), "bands, H, W"),
        (np.ones((2, 10, 10), np.float32) / 2, np.zeros((3, 10, 10), bool), "numeric"),
        (np.full((2, 10, 10), np.nan, np.float32), np.zeros((3, 10, 10), np.uint8), "NaN"),
        (np.ones((1, 10, 10), np.float32), np.zeros((3, 10, 10), np.uint8), "two classes"),
    ],
)
def test_shape_and_dtype_mismatches_are_clear_errors(
    probabilities: np.ndarray, image: np.ndarray, message: str
) -> None:
    with pytest.raises(CRFError, match=message):
        refine(probabilities, image)


def test_the_crf_of_a_core_needs_only_its_kernels_reach_of_the_window(kampala: Path) -> None:
    """The engine cuts the model's window (core + halo) to the core + 3 σ of the CRF's widest kernel before
    refining: on a real scene window the core's labels stay the same, where the cut applies at all."""
    scene = kampala / "scene"
    region = ((512, 1280), (512, 1280))  # a 768 px window: a 256 px core with a 256 px halo
    with rasterio.open(scene / "kampala_z21_rgb.tif") as source:
        image = source.read(window=region)
    with rasterio.open(scene / "kampala_z21_buildings.tif") as source:
        probabilities = _blurred(source.read(1, window=region) == 1)
    tile = Tile(2, 2, 768, 768, 256, 256, 256, 2048, 3072)
    tuned = CRFParams(w1=7, sigma_alpha=20, sigma_beta=2.25)  # buildings-kampala's: a 60 px reach
    cut_tile, cut_probabilities, cut_image = crf_inputs(tile, probabilities, image, tuned)
    assert cut_tile.window == (768 - 60, 768 - 60, 376, 376)
    assert cut_probabilities.shape == (2, 376, 376) and cut_image.shape == (3, 376, 376)
    for params, least in ((tuned, 0.999), (CRFParams(), 1.0)):  # the paper's σα 121 reaches past the halo
        whole_window = core_of(refine(probabilities, image, params, 255.0), tile).argmax(0)
        cut = CRFWorker().refine_core(probabilities, image, params, 255.0, tile)[0]
        assert (whole_window == cut).mean() >= least, params
