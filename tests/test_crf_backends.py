"""The torch dense CRF against pydensecrf2 on real windows and real model probabilities; its lattice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from models.checkpoint import load_checkpoint
from models.data import read_image
from models.metadata import CRFParams
from pipeline.crf import backend, lattice
from pipeline.crf.mean_field import TorchCRF
from pipeline.engine.workers import ModelWorker

AGREEMENT = 0.995  # the bar: argmax labels agree on at least this share of pixels


def _probabilities(model: Path, window: np.ndarray) -> np.ndarray:
    worker = ModelWorker(str(model), device="cpu", threads=None, amp=False)
    return worker.predict([window], (1.0,), "max", as_probabilities=True)[0].astype(np.float32)


def _agreement(probabilities: np.ndarray, image: np.ndarray, params: CRFParams, input_max: float) -> float:
    reference = backend("pydensecrf").refine_labels(probabilities, image, params, input_max)
    ours = backend("torch").refine_labels(probabilities, image, params, input_max)
    changed = (reference != probabilities.argmax(0)).mean()
    assert changed > 0.001, "the CRF must change some labels here, else agreement proves nothing"
    return float((reference == ours).mean())


@pytest.fixture(scope="module")
def kampala_window(kampala: Path) -> np.ndarray:
    with rasterio.open(kampala / "scene" / "kampala_z21_rgb.tif") as source:
        return source.read((1, 2, 3), window=((1024, 1408), (1536, 1920)))


def test_torch_crf_agrees_with_pydensecrf_on_the_kampala_scene(
    kampala_window: np.ndarray, reference_buildings_model: Path
) -> None:
    params = load_checkpoint(reference_buildings_model).metadata.crf  # the tuned ones: w1 7, σα 20, σβ 2.25
    probabilities = _probabilities(reference_buildings_model, kampala_window)
    assert _agreement(probabilities, kampala_window, params, 255.0) >= AGREEMENT


def test_torch_crf_agrees_with_pydensecrf_on_dubai_with_six_classes(
    dubai: Path, landcover_model: Path
) -> None:
    image = read_image(dubai / "images" / "tile3_image_part_004.jpg")[:, :320, :320]
    probabilities = _probabilities(landcover_model, image)
    assert probabilities.shape[0] == 6
    for params in (load_checkpoint(landcover_model).metadata.crf, CRFParams()):  # tuned, and the paper's
        assert _agreement(probabilities, image, params, 255.0) >= AGREEMENT


def test_torch_crf_agrees_with_pydensecrf_on_four_band_uint16(
    kampala_window: np.ndarray, reference_buildings_model: Path
) -> None:
    probabilities = _probabilities(reference_buildings_model, kampala_window)[:, :256, :256]
    rgb = kampala_window[:, :256, :256].astype(np.uint16) * 257
    four_band = np.concatenate(
        [rgb, rgb.mean(0, keepdims=True).astype(np.uint16)]
    )  # pydensecrf's generic path
    assert (
        _agreement(probabilities, four_band, CRFParams(w1=7, sigma_alpha=20, sigma_beta=3), 65535.0)
        >= AGREEMENT
    )


def test_a_batch_of_windows_of_different_sizes_is_refined_as_each_alone(
    kampala_window: np.ndarray, reference_buildings_model: Path
) -> None:
    probabilities = torch.from_numpy(_probabilities(reference_buildings_model, kampala_window))
    image = torch.from_numpy(kampala_window)
    cuts = [
        (slice(0, 200), slice(0, 300)),
        (slice(150, 384), slice(100, 250)),
        (slice(300, 301), slice(0, 64)),
    ]
    crf, params = TorchCRF("cpu"), CRFParams(w1=7, sigma_alpha=20, sigma_beta=2.25)
    together = crf.refine_tensors(
        [probabilities[:, r, c] for r, c in cuts], [image[:, r, c] for r, c in cuts], params, 255.0
    )
    for (rows, cols), batched in zip(cuts, together, strict=True):
        alone = crf.refine_tensors([probabilities[:, rows, cols]], [image[:, rows, cols]], params, 255.0)[0]
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_marginals_are_distributions_and_nodata_keeps_its_input(kampala_window: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet((1.0, 1.0, 1.0), size=(64, 64)).transpose(2, 0, 1).astype(np.float32)
    valid = np.ones((64, 64), bool)
    valid[:, :10] = False
    refined = backend("torch").refine(probabilities, kampala_window[:, :64, :64], CRFParams(), valid=valid)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(refined[:, :, :10], probabilities[:, :, :10])


def test_lattice_filters_a_constant_to_a_constant_away_from_edges_and_groups_never_mix() -> None:
    rows, cols = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    points = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1) / 3.0
    alone = lattice.Permutohedral
    ones = torch.ones(points.shape[0], 1)
    response = alone(points).filter(ones).view(40, 40)
    inner = response[12:-12, 12:-12]
    assert torch.allclose(inner, inner.mean().expand_as(inner), rtol=0.05)  # a spatially uniform blur
    assert response[0, 0] < inner.mean()  # less mass reaches a corner
    values = torch.rand(points.shape[0], 2)
    twice = lattice.Permutohedral(
        torch.cat([points, points]), torch.cat([torch.zeros(1600), torch.ones(1600)]).long()
    )
    both = twice.filter(torch.cat([values, values]))
    torch.testing.assert_close(both[:1600], alone(points).filter(values))
    torch.testing.assert_close(both[1600:], both[:1600])


def test_the_key_table_gives_the_packed_codes_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys too wide to pack into one int64 (many bands, fine kernels) take the table: the same filter."""
    features = torch.rand(3000, 4) * torch.tensor([30.0, 30.0, 50.0, 50.0])
    values = torch.rand(3000, 3)
    packed = lattice.Permutohedral(features)
    monkeypatch.setattr(lattice, "_PACKABLE", 2)
    table = lattice.Permutohedral(features)
    assert packed.packed and not table.packed
    assert table.vertices == packed.vertices
    torch.testing.assert_close(table.filter(values), packed.filter(values))
