"""Seams: tiling must add no error at core borders (the engine's tile plan, padding and worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from bench.seams import (
    compare,
    predict_tiled,
    predict_whole,
    random_subject,
    scene_context,
    worker_for,
)
from models.checkpoint import load_checkpoint, read_metadata
from pipeline.engine.grid import model_halo

TILE = 512


@pytest.mark.slow
def test_a_model_without_global_context_tiles_like_the_whole_image(
    landsat: Path, landcover_model: Path
) -> None:
    """DeepLab-LargeFOV has no image-level branch: with the default halo (its receptive field) tiled output
    must match whole-image output. The subject is a seeded random LargeFOV centred so every class wins
    somewhere (no trained LargeFOV fits this CPU's budget); random nets have the widest effective fields."""
    with rasterio.open(landsat) as scene:
        image = scene.read()
        valid = scene.dataset_mask() > 0
    subject = random_subject("deeplab_largefov_vgg16", read_metadata(landcover_model), image, valid)
    halo = model_halo(subject.metadata, None, TILE)
    assert halo == 224  # its receptive field, 209 px, on the 32 px lattice
    worker = worker_for(subject)
    tiled = predict_tiled(worker, image, TILE, halo)
    whole = predict_whole(worker, image)
    shares = np.bincount(whole[valid], minlength=6) / valid.sum()
    assert (shares > 0.05).sum() >= 4, "a non-trivial subject: several classes hold real shares"
    figures = compare(tiled, whole, valid, TILE)
    assert figures.agreement >= 0.995, figures


@pytest.mark.slow
def test_a_trained_v2_aspp_model_tiles_like_the_whole_image(
    kampala: Path, landsat: Path, buildings_v2_model: Path
) -> None:
    """DeepLab-v2 ASPP (summed atrous branches, no image pooling), trained on the Kampala chips: with the
    default core and halo, tiled output matches whole-image output on both real scenes (Kampala: its first
    2048 columns, to keep the suite short; bench/seams.py measures the whole scene: 99.99%)."""
    loaded = load_checkpoint(buildings_v2_model)
    assert loaded.metadata.architecture == "deeplabv2_efficientnet_lite0"
    halo = model_halo(loaded.metadata, None, TILE)
    worker = worker_for(loaded)
    for path in (kampala / "scene" / "kampala_z21_rgb.tif", landsat):
        with rasterio.open(path) as scene:
            image = scene.read()[:, :, :2048]
            valid = scene.dataset_mask()[:, :2048] > 0
        tiled = predict_tiled(worker, image, TILE, halo)
        whole = predict_whole(worker, image)
        assert 0.02 < (whole[valid] == 1).mean() < 0.98, "a non-trivial subject: both classes present"
        figures = compare(tiled, whole, valid, TILE)
        assert figures.agreement >= 0.995, (path.name, figures)


@pytest.mark.slow
def test_v3_disagreement_is_little_higher_at_core_borders(kampala: Path, buildings_model: Path) -> None:
    """DeepLab-v3's image pooling and wide atrous rates make every prediction depend on the window seen:
    agreement with whole-image output is below 100% everywhere. Measured with the default halo (256 px)
    and windows clipped at the scene's edges: excess at borders 1.06 points against whole-image output and
    0.74 against a tiling shifted by half a core (with reflection-padded edge windows it was 1.25 and 0.48).
    The bounds guard against regressions."""
    loaded = load_checkpoint(buildings_model)
    with rasterio.open(kampala / "scene" / "kampala_z21_rgb.tif") as scene:
        image = scene.read()
        valid = scene.dataset_mask() > 0
    halo = model_halo(loaded.metadata, None, TILE)
    worker = worker_for(loaded)
    tiled = predict_tiled(worker, image, TILE, halo)
    against_whole = compare(tiled, predict_whole(worker, image), valid, TILE)
    against_shifted = compare(tiled, predict_tiled(worker, image, TILE, halo, shift=TILE // 2), valid, TILE)
    assert against_whole.agreement > 0.975
    assert against_whole.excess_at_borders <= 0.0125, against_whole
    assert against_shifted.excess_at_borders <= 0.009, against_shifted
    assert np.isin(tiled[valid], [0, 1]).all()


@pytest.mark.slow
def test_v3_with_scene_context_has_no_seams(kampala: Path, buildings_model: Path) -> None:
    """``--context scene``: the image-pooling branch gets the scene's pooled features (the engine's own pass
    over every core) instead of each window's, and the halo may grow to a whole core. Measured on the whole
    Kampala scene with the exact whole-image vector: excess 0.17 points against whole-image output, 0.11
    against a shifted tiling (per-window pooling: 1.06 and 0.74). Here: a 2048² part, the engine's pass."""
    loaded = load_checkpoint(buildings_model)
    with rasterio.open(kampala / "scene" / "kampala_z21_rgb.tif") as scene:
        image = scene.read()[:, :, :2048]
    valid = np.ones(image.shape[1:], bool)
    halo = model_halo(loaded.metadata, None, TILE, scene_context=True)
    assert halo == TILE  # no window changes the pooled vector any more: the receptive field decides
    worker = worker_for(loaded)
    context = scene_context(worker, image, valid, TILE, halo)
    tiled = predict_tiled(worker, image, TILE, halo, context=context)
    against_whole = compare(tiled, predict_whole(worker, image), valid, TILE)
    shifted = predict_tiled(worker, image, TILE, halo, shift=TILE // 2, context=context)
    against_shifted = compare(tiled, shifted, valid, TILE)
    assert against_whole.agreement >= 0.995, against_whole
    assert against_whole.excess_at_borders <= 0.005, against_whole
    assert against_shifted.excess_at_borders <= 0.005, against_shifted
