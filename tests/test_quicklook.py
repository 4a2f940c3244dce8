"""The quicklook's colours: a class drawn in its own colour where that stands out from the image under it,
in a contrasting one where it would vanish (pink stroma on pink H&E), and background classes not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import tiffslide
from PIL import Image

from models.checkpoint import read_metadata
from pipeline.io.cog import LUMA, MIN_LIGHTNESS, drawing_colours, write_quicklook
from tests.conftest import ZOO, kampala_chip


def test_classes_that_would_vanish_into_h_and_e_are_drawn_in_contrasting_colours(
    cmu_slide: Path, tmp_path: Path
) -> None:
    with tiffslide.TiffSlide(cmu_slide) as slide:
        rgb = np.asarray(slide.read_region((600, 1200), 0, (768, 768)))[..., :3].astype(np.float32)
    luma = rgb @ LUMA
    labels = np.where(luma > 200, 0, np.where(luma < 90, 2, 1)).astype(np.uint8)  # glass, stroma, nuclei
    classes = read_metadata(ZOO / "he-stain-cmu.safetensors").classes
    drawn = drawing_colours(rgb, labels, classes)
    assert set(drawn) == {1, 2}, "background is not drawn"
    assert drawn[1] != tuple(classes[1].color) and drawn[2] != tuple(classes[2].color)
    assert drawn[1] != drawn[2]
    for value, colour in drawn.items():  # each stands apart in lightness from the tissue under it
        under = rgb[labels == value].mean(axis=0)
        assert abs(float(LUMA @ np.asarray(colour, np.float32)) - float(LUMA @ under)) >= MIN_LIGHTNESS
    out = tmp_path / "quicklook.png"
    write_quicklook(np.moveaxis(rgb.astype(np.uint8), -1, 0), labels, classes, out)
    picture = np.asarray(Image.open(out))
    assert picture.shape[0] == 768 + 18 * 3 + 8  # the image and a legend line per class
    assert (picture[:768][labels == 0] == rgb.astype(np.uint8)[labels == 0]).all(), "glass left as it is"


def test_a_class_colour_that_stands_out_is_kept(kampala: Path) -> None:
    image_path, mask_path = kampala_chip(kampala)
    with rasterio.open(image_path) as image, rasterio.open(mask_path) as mask:
        rgb = np.moveaxis(image.read(), 0, -1).astype(np.float32)
        labels = mask.read(1)
    classes = read_metadata(ZOO / "buildings-kampala.safetensors").classes
    assert drawing_colours(rgb, labels, classes) == {1: tuple(classes[1].color)}
