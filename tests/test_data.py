from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab_common.errors import DataError
from models.augment import AugmentSettings, random_crop
from models.data import Pair, pairs_from_csv, pairs_from_folders, pixel_size_m, split_pairs
from models.training_images import LoadedPair

HELD_OUT_CELL = (32.595062255859375, 0.35018702872728885, 32.59574890136719, 0.3508736613849764)


def test_csv_pairs_and_split_by_ground_area(kampala: Path) -> None:
    pairs = pairs_from_csv(kampala / "chips.csv")
    assert len(pairs) == 126
    train, val = split_pairs(pairs, val_bbox=HELD_OUT_CELL)
    assert len(val) == 16 + 4 + 1  # the zoom-19 cell and the zoom-20/21 chips on its ground
    assert {p.stem for p in val} & {p.stem for p in train} == set()
    assert "OAM-309614-261633-19" in {p.stem for p in val}


def test_split_by_list_and_pattern(kampala: Path, tmp_path: Path) -> None:
    pairs = pairs_from_folders(kampala / "chips", kampala / "masks")
    listing = tmp_path / "val.txt"
    listing.write_text("# held out\nOAM-1238448-1046528-21.tif\nOAM-1238448-1046529-21\n")
    train, val = split_pairs(pairs, val_list=listing, val_patterns=["*-19"])
    assert len(val) == 2 + 6 and len(train) == 126 - 8
    listing.write_text("no-such-chip\n")
    with pytest.raises(DataError, match="not among the pairs"):
        split_pairs(pairs, val_list=listing)


def test_image_without_a_mask_is_named(kampala: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "other.png").write_bytes(b"")
    with pytest.raises(DataError, match="no mask with the stem"):
        pairs_from_folders(kampala / "chips", masks)


def test_pixel_size_of_geographic_chips(kampala: Path, dubai: Path) -> None:
    assert pixel_size_m(kampala / "chips" / "OAM-1238448-1046528-21.tif") == pytest.approx(0.0746, abs=1e-3)
    assert pixel_size_m(kampala / "chips" / "OAM-309612-261632-19.tif") == pytest.approx(0.2986, abs=4e-3)
    assert pixel_size_m(next((dubai / "images").glob("*.jpg"))) is None


def test_random_crop_is_seeded_and_pads_with_ignore() -> None:
    image = torch.arange(3 * 50 * 60, dtype=torch.float32).reshape(3, 50, 60)
    mask = torch.ones(50, 60, dtype=torch.int64)
    settings = AugmentSettings(crop_size=96, scale_range=(0.9, 1.1))
    source = LoadedPair(Pair("synthetic", Path("synthetic.tif"), Path("synthetic-mask.tif")), image, mask)
    a = random_crop(source, settings, np.random.default_rng(5), ignore_index=255)
    b = random_crop(source, settings, np.random.default_rng(5), ignore_index=255)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 96, 96) and a[1].shape == (96, 96)
    assert set(a[1].unique().tolist()) == {1, 255}  # the crop is larger than the image: padding is ignored
