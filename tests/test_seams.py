"""Seams: tiling must add no error at core borders (the engine's tile plan, padding and worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from bench.seams import compare, predict_tiled, predict_whole, worker_for
from models.checkpoint import load_checkpoint
from models.receptive_field import receptive_radius
from pipeline.grid import default_halo

TILE = 512


@pytest.mark.slow
def test_v3_disagreement_is_no_higher_at_core_borders(kampala: Path, buildings_model: Path) -> None:
    """DeepLab-v3's image pooling makes every window's prediction depend on the window: agreement with
    whole-image output is below 100% everywhere, but core borders must be no worse than core interiors."""
    loaded = load_checkpoint(buildings_model)
    with rasterio.open(kampala / "scene" / "kampala_z21_rgb.tif") as scene:
        image = scene.read()
        valid = scene.dataset_mask() > 0
    arch_args = tuple(sorted(loaded.metadata.arch_args.items()))
    halo = default_halo(receptive_radius(loaded.metadata.architecture, arch_args), None, TILE)
    worker = worker_for(loaded)
    tiled = predict_tiled(worker, image, TILE, halo)
    whole = predict_whole(worker, image, halo)
    shifted = predict_tiled(worker, image, TILE, halo, shift=TILE // 2)
    against_whole = compare(tiled, whole, valid, TILE)
    against_shifted = compare(tiled, shifted, valid, TILE)
    assert against_whole.agreement > 0.9
    assert against_whole.excess_at_borders <= 0.005, against_whole
    assert against_shifted.excess_at_borders <= 0.005, against_shifted
    assert np.isin(tiled[valid], [0, 1]).all()
