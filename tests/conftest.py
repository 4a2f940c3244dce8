"""Shared fixtures: the real data in ../shared/data and the committed reference models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
ZOO = ROOT / "models" / "zoo"

torch.set_num_threads(2)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real data not available: {path} is absent (expected ../shared/data beside the checkout)"
        )
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def kampala(data_dir: Path) -> Path:
    return _require(data_dir / "kampala-buildings")


@pytest.fixture(scope="session")
def dubai(data_dir: Path) -> Path:
    return _require(data_dir / "dubai-landcover")


@pytest.fixture(scope="session")
def landsat(data_dir: Path) -> Path:
    return _require(data_dir / "landsat" / "RGB.byte.tif")


@pytest.fixture(scope="session")
def buildings_model() -> Path:
    path = ZOO / "buildings-kampala.safetensors"
    assert path.exists(), f"the reference model {path} must be committed"
    return path


@pytest.fixture(scope="session")
def landcover_model() -> Path:
    path = ZOO / "landcover-dubai.safetensors"
    assert path.exists(), f"the reference model {path} must be committed"
    return path


def kampala_chip(kampala: Path, stem: str = "OAM-1238456-1046532-21") -> tuple[Path, Path]:
    return kampala / "chips" / f"{stem}.tif", kampala / "masks" / f"{stem}.tif"


def copy_kampala_pairs(kampala: Path, target: Path, stems: tuple[str, ...]) -> tuple[Path, Path]:
    """Copy chips and masks into ``target/images`` and ``target/masks``; returns the two folders."""
    images, masks = target / "images", target / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in stems:
        shutil.copy(kampala / "chips" / f"{stem}.tif", images)
        shutil.copy(kampala / "masks" / f"{stem}.tif", masks)
    return images, masks


@pytest.fixture(scope="session")
def cmu_slide(data_dir: Path) -> Path:
    return _require(data_dir / "wsi" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def tcga_slide(data_dir: Path) -> Path:
    return _require(data_dir / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs")
