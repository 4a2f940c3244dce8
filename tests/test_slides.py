"""Whole-slide sources: readers, µm/px, level choice, reads on the working grid, tissue detection."""

from __future__ import annotations

import numpy as np
import pytest
from ome_zarr_models.v05.image import Image as OmeZarrImage
from PIL import Image

from deeplab_common.errors import DataError, ResolutionMismatch
from models.metadata import ClassInfo
from pipeline.io.slides import (
    choose_grid,
    describe_slide,
    is_slide,
    open_slide,
    read_working_block,
    thumbnail,
)
from pipeline.io.tissue import detect_tissue, otsu_threshold


def test_cmu_slide_metadata_and_grid(cmu_slide) -> None:
    info = describe_slide(cmu_slide)
    assert info.reader == "tiffslide" and info.levels == 1
    assert info.level_dimensions == ((2220, 2967),) and info.mpp == pytest.approx(0.499)
    assert info.vendor == "aperio" and info.objective_power == 20
    native = choose_grid(info, None)
    assert native.shape == (2967, 2220) and native.scale == 1.0
    coarse = choose_grid(info, 1.0)
    assert coarse.level == 0 and coarse.scale == pytest.approx(0.499)
    assert coarse.shape == (round(2967 * 0.499), round(2220 * 0.499))
    assert coarse.level_0_per_working_px == pytest.approx(1 / 0.499)
    assert choose_grid(info, 0.25).scale == 1.0, (
        "never upsampled: a finer model works at the slide's own µm/px"
    )


def test_tcga_slide_needs_mpp_and_picks_its_level(tcga_slide) -> None:
    info = describe_slide(tcga_slide)
    assert info.levels == 2 and info.level_dimensions == ((4443, 3567), (2221, 1783)) and info.mpp is None
    with pytest.raises(
        DataError, match=r"TCGA-CR-7395-01A-01-TS1.svs: no µm/px in the slide's metadata; pass --mpp"
    ):
        choose_grid(info, 0.5)
    given = describe_slide(tcga_slide, mpp=0.25)
    grid = choose_grid(given, 0.5)
    assert grid.level == 1 and grid.scale == pytest.approx(1.0, abs=1e-3)
    assert grid.shape == (1784, 2222), "level 0 halved (level 1 is 1783 x 2221: its downsample is 2.0005)"
    between = choose_grid(given, 0.4)
    assert between.level == 0 and between.scale == pytest.approx(0.625), "the finer level, downsampled"
    with pytest.raises(DataError, match="--mpp must be positive"):
        describe_slide(tcga_slide, mpp=0)


def test_both_readers_decode_jpeg2000_tiles(tcga_slide) -> None:
    for reader in ("tiffslide", "openslide"):
        with open_slide(tcga_slide, prefer=reader) as slide:
            assert type(slide).__module__.split(".")[0] == reader
            pixels = np.asarray(slide.read_region((2000, 1500), 0, (32, 32)).convert("RGB"))
            assert pixels.std() > 5, "real tissue, decoded"


def test_truncated_and_foreign_files_are_refused(cmu_slide, tmp_path, landsat) -> None:
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(cmu_slide.read_bytes()[: cmu_slide.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut.svs: not a readable slide"):
        describe_slide(truncated)
    with pytest.raises(DataError, match="slide does not exist"):
        describe_slide(tmp_path / "missing.svs")
    assert is_slide(cmu_slide) and not is_slide(landsat)


def test_working_block_matches_a_resampled_level_read(cmu_slide) -> None:
    info = describe_slide(cmu_slide)
    grid = choose_grid(info, 1.0)
    with open_slide(cmu_slide) as slide:
        scale = 1 / grid.level_0_per_working_px
        block = read_working_block(slide, info, scale, 200, 300, 64, 48)
        assert block.shape == (3, 64, 48) and block.dtype == np.uint8
        origin = (round(300 / grid.scale), round(200 / grid.scale))
        size = (int(np.ceil(48 / grid.scale)), int(np.ceil(64 / grid.scale)))
        direct = slide.read_region(origin, 0, size).convert("RGB").resize((48, 64), Image.Resampling.BOX)
        assert np.abs(block.transpose(1, 2, 0).astype(int) - np.asarray(direct).astype(int)).max() <= 1
        edge = read_working_block(slide, info, scale, grid.shape[0] - 8, grid.shape[1] - 8, 8, 8)
        assert edge.shape == (3, 8, 8)


def test_otsu_splits_two_modes() -> None:
    values = np.concatenate([np.full(1000, 0.1), np.full(500, 0.7)])
    assert 0.1 < otsu_threshold(values) < 0.7


def test_tissue_keeps_stain_and_drops_glass_and_ink() -> None:
    glass = np.full((200, 200, 3), (238, 236, 240), dtype=np.uint8)
    yy, xx = np.mgrid[:200, :200]
    disk = (yy - 100) ** 2 + (xx - 90) ** 2 < 50**2
    glass[disk] = (205, 110, 170)  # eosin pink
    glass[disk & (xx % 7 == 0)] = (110, 60, 150)  # haematoxylin purple nuclei
    glass[20:26, 10:190] = (40, 70, 200)  # blue pen line on glass
    glass[170:180, 170:180] = (20, 20, 20)  # black debris
    result = detect_tissue(glass)
    assert result.mask[disk].mean() > 0.97
    assert not result.mask[20:26, 10:190].any() and not result.mask[170:180, 170:180].any()
    assert result.mask[~disk].mean() < 0.01
    assert result.pen[20:26, 10:190].all()


def test_blank_glass_has_no_tissue() -> None:
    blank = np.full((64, 64, 3), 242, dtype=np.uint8)
    blank[..., 2] = 246
    assert detect_tissue(blank).fraction == 0.0


def test_tissue_on_real_slides(cmu_slide, tcga_slide) -> None:
    for path, low, high in ((cmu_slide, 0.28, 0.48), (tcga_slide, 0.55, 0.72)):
        with open_slide(path) as slide:
            rgb, per_px = thumbnail(slide, 1024)
        assert max(rgb.shape[:2]) == 1024 and per_px > 1
        assert low < detect_tissue(rgb).fraction < high, path.name


def test_preflight_of_slides(cmu_slide, tcga_slide, buildings_model) -> None:
    from models.checkpoint import read_metadata
    from pipeline.engine.preflight import preflight
    from pipeline.io.readers import describe

    aerial = read_metadata(buildings_model)
    refused = preflight(describe(cmu_slide), aerial)
    assert not refused.problems and refused.mismatches == [
        "the model was trained at 7.46e+04 µm/px, over 64x coarser than the slide's 0.499 µm/px: "
        "not a model for slides"
    ]
    with pytest.raises(ResolutionMismatch, match="not a model for slides"):
        refused.raise_if_refused()
    at_one_um = aerial.model_copy(update={"pixel_size_m": 1e-6})
    check = preflight(describe(cmu_slide), at_one_um)
    assert not check.problems and check.scale == pytest.approx(0.499)
    assert check.warnings == ["segmented at the model's 1 µm/px (level 0, 0.499 µm/px at level 0)"]
    assert "pass --mpp" in preflight(describe(tcga_slide), at_one_um).problems[0]
    assert not preflight(describe(tcga_slide, mpp=0.25), at_one_um).problems


def test_stain_separation_and_labels() -> None:
    from models.stain import RGB_FROM_HED, separate_stains, stain_labels

    # pure haematoxylin and pure eosin at optical density 1 come back as (1, 0, 0) and (0, 1, 0)
    for index in (0, 1):
        rgb = np.round(255 * np.exp(-RGB_FROM_HED[index])).astype(np.uint8)[None, None]
        stains = separate_stains(rgb)[0, 0]
        assert stains[index] == pytest.approx(1.0, abs=0.02) and stains[1 - index] < 0.05
    image = np.full((40, 40, 3), 245, dtype=np.uint8)
    image[:, 20:] = (200, 90, 160)  # eosin-stained tissue
    image[25:35, 25:35] = (70, 40, 130)  # a haematoxylin-dense nucleus
    tissue = np.zeros((40, 40), dtype=bool)
    tissue[:, 10:] = True  # the coarse region reaches into glass: that part stays background
    labels = stain_labels(image, tissue, nuclei_threshold=0.8)
    assert (labels[:, :20] == 0).all() and (labels[:5, 20:] == 1).all() and (labels[27:33, 27:33] == 2).all()


@pytest.mark.slow
def test_slide_chips_hold_out_a_separate_band(cmu_slide, tmp_path) -> None:
    from pipeline.tools.slide_chips import cut_chips

    summary = cut_chips(cmu_slide, tmp_path, size=256, stride=256, holdout_from=0.75)
    stems = sorted(p.stem for p in (tmp_path / "images").iterdir())
    assert len(stems) == summary.train + summary.val and summary.train > 10 and summary.val > 3
    boundary = int(2967 * 0.75)
    for stem in stems:
        top = int(stem.split("-y")[1].split("-")[0])
        assert (top >= boundary) == ("-val-" in stem) and ("-val-" in stem or top + 256 <= boundary)
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{stem}.png"))
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1, 2}
    assert 0.02 < summary.class_share[2] < 0.1, "nuclei: a few percent of the slide"


def test_ome_pyramids_tiff_and_zarr(tmp_path) -> None:
    import tiffslide
    import zarr

    from pipeline.io.ome import mode_2x2, write_ome_pyramid, write_ome_zarr

    assert mode_2x2(np.array([[1, 2, 3], [1, 5, 3]], dtype=np.uint8)).tolist() == [[1, 3]]
    labels = np.random.default_rng(0).integers(0, 3, (1100, 700)).astype(np.uint8)
    labels[:, :100] = 255
    shapes = write_ome_pyramid(labels, 0.5, tmp_path / "m.ome.tif", tmp_path / "scratch", "m", tile=256)
    assert shapes == [(1100, 700), (550, 350), (275, 175), (138, 88)]
    assert not (tmp_path / "scratch").exists()
    with tiffslide.TiffSlide(tmp_path / "m.ome.tif") as slide:
        assert slide.level_dimensions == ((700, 1100), (350, 550), (175, 275), (88, 138))
        assert float(slide.properties["tiffslide.mpp-x"]) == 0.5
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (700, 1100))), labels)
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 1, (350, 550))), mode_2x2(labels))
    image = np.random.default_rng(1).integers(0, 256, (3, 1100, 700)).astype(np.uint8)
    classes = [ClassInfo(name=n, color=(9, 9, 9)) for n in ("a", "b", "c")]
    zarr_shapes = write_ome_zarr(image, labels, 0.5, tmp_path / "m.ome.zarr", "m", classes, tile=256)
    assert zarr_shapes == shapes
    group = zarr.open_group(tmp_path / "m.ome.zarr", mode="r")
    OmeZarrImage.from_zarr(group)  # NGFF 0.5, as ome-zarr-models reads it: an image with a label image
    label = group["labels/mask"]
    multiscale = label.attrs["ome"]["multiscales"][0]
    assert [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]] == [
        [0.5, 0.5],
        [1.0, 1.0],
        [2.0, 2.0],
        [4.0, 4.0],
    ]
    image_scales = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"][0] for d in image_scales] == [1.0] * 4  # channels
    assert np.array_equal(label["0"][:], labels) and np.array_equal(label["1"][:], mode_2x2(labels))
    assert np.array_equal(group["0"][:], image)
    halved = image[:, :2, :2].astype(np.float32).mean(axis=(1, 2))
    assert np.array_equal(group["1"][:, 0, 0], np.round(halved).astype(np.uint8)), "image levels: 2x2 mean"
