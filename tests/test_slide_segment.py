"""Slides through the one engine: tissue-only cores, an OME-TIFF pyramid at the working µm/px, QuPath
polygons in level-0 coordinates, areas in mm²; a slide without µm/px is refused unless --mpp is given."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pystac
import pytest
import tiffslide
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from rasterio.features import rasterize
from rasterio.transform import Affine
from stac_pydantic import Item as StacItem

from models.checkpoint import update_metadata
from pipeline.engine.driver import run_batch
from pipeline.engine.options import SegmentOptions
from tests.conftest import resume_after_kill, tiny_like

WORKING_MPP = 1.0


@pytest.fixture(scope="module")
def slide_model(buildings_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-band checkpoint declared to be trained at 1 µm/px: the engine's slide path, not a result."""
    path = tmp_path_factory.mktemp("model") / "at-1um.safetensors"
    shutil.copy(buildings_model, path)
    update_metadata(path, pixel_size_m=WORKING_MPP * 1e-6)
    return path


def _check_slide_item(folder: Path, report: dict) -> None:
    """A slide's STAC Item: no geometry claimed for pixel coordinates; its µm/px and its assets instead."""
    document = json.loads((folder / "item.json").read_text())
    StacItem.model_validate(document)
    item = pystac.Item.from_dict(document)
    assert item.geometry is None and item.bbox is None
    assert item.properties["deeplab:microns_per_pixel"] == pytest.approx(WORKING_MPP)
    assert item.assets["ome_zarr"].media_type == pystac.MediaType.ZARR
    assert item.assets["mask"].extra_fields["bands"][0]["raster:spatial_resolution"] == pytest.approx(1e-6)
    assert "proj:code" not in item.properties


def _levels(path: Path) -> tuple[tuple[tuple[int, int], ...], float, np.ndarray]:
    with tiffslide.TiffSlide(path) as slide:
        width, height = slide.level_dimensions[0]
        labels = np.asarray(slide.read_region((0, 0), 0, (width, height)))
        return slide.level_dimensions, float(slide.properties["tiffslide.mpp-x"]), labels


@pytest.mark.slow
def test_cmu_slide_end_to_end(cmu_slide: Path, slide_model: Path, tmp_path: Path) -> None:
    options = SegmentOptions(engine="local", crf=False, vectorize=True, ome_zarr=True)
    (result,) = run_batch(cmu_slide, slide_model, tmp_path, options).results.values()
    folder = tmp_path / "CMU-1-Small-Region"
    report = json.loads((folder / "report.json").read_text())
    scale = 0.499 / WORKING_MPP
    shape = (round(2967 * scale), round(2220 * scale))
    assert report["model_grid"] == list(shape) and report["slide"]["working_mpp"] == pytest.approx(1.0)
    assert report["slide"]["level_read"] == 0 and report["crs"] is None

    dimensions, mpp, labels = _levels(folder / "mask.ome.tif")
    assert dimensions[0] == (shape[1], shape[0]) and mpp == pytest.approx(1.0)
    assert dimensions[1] == ((shape[1] + 1) // 2, (shape[0] + 1) // 2) and len(dimensions) == 3
    tissue = labels != 255
    assert 0.25 < tissue.mean() < 0.5, "glass left as nodata"
    # OME-Zarr: the slide at the working µm/px with the mask as its label image, as NGFF 0.5 has them
    group = zarr.open_group(folder / "slide.ome.zarr", mode="r")
    image = Image.from_zarr(group)
    assert image.labels is not None and image.labels.label_paths == ["mask"]
    label = ImageLabel.from_zarr(group["labels/mask"])
    attributes = label.attributes.ome.image_label
    assert attributes is not None and attributes.source is not None and attributes.source.image == "../../"
    assert [p.label_value for p in attributes.properties or ()] == [0, 1, 255]
    assert np.array_equal(group["labels/mask/0"][:], labels) and group["0"].shape == (3, *shape)
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"]) == 3
    assert set(report["outputs"]) == {"mask", "ome_zarr", "polygons", "quicklook", "report", "item"}
    _check_slide_item(folder, report)

    tiles = report["tiles"]
    assert tiles["skipped"] > 0 and tiles["computed"] + tiles["skipped"] == tiles["total"] == 9
    assert report["background_cores_share"] == pytest.approx(tiles["skipped"] / 9, abs=1e-4)
    assert report["tissue_area_mm2"] == pytest.approx(tissue.sum() * 1e-6, rel=1e-6)
    assert sum(report["class_areas_mm2"].values()) == pytest.approx(report["tissue_area_mm2"])

    features = json.loads((folder / "polygons.geojson").read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}
    names = {
        f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
        for f in features
    }
    assert set(names) == {"building"} and all(len(c) == 3 for c in names.values()), "background left out"
    level_0_per_px = Affine.scale(1 / scale)  # mask pixel -> level-0 slide pixel
    xmax = max(max(x for x, _ in f["geometry"]["coordinates"][0]) for f in features)
    assert shape[1] < xmax <= 2220 + 1, "polygons are in level-0 slide pixels, beyond the mask's width"
    shapes = [f["geometry"] for f in features]
    drawn = rasterize(((s, 1) for s in shapes), out_shape=shape, transform=level_0_per_px, dtype="uint8")
    truth = labels == 1
    iou = (truth & (drawn > 0)).sum() / (truth | (drawn > 0)).sum()
    assert iou >= 0.95, iou  # small regions merged into their neighbours, outlines within a pixel
    assert result.mask == folder / "mask.ome.tif"


@pytest.mark.slow
def test_tcga_slide_needs_mpp(tcga_slide: Path, slide_model: Path, tmp_path: Path) -> None:
    options = SegmentOptions(engine="local", crf=False)
    refused = run_batch(tcga_slide, slide_model, tmp_path, options)
    assert (
        refused.exit_code == 1
        and "TCGA-CR-7395-01A-01-TS1.svs: no µm/px in the slide's metadata; pass --mpp"
        in (refused.failed[0].message)
    )
    given = options.model_copy(update={"mpp": 0.25})  # level 1 is 0.5 µm/px, resampled by 1/2 to 1 µm/px
    assert run_batch(tcga_slide, slide_model, tmp_path, given).exit_code == 0
    report = json.loads((tmp_path / "TCGA-CR-7395-01A-01-TS1" / "report.json").read_text())
    assert report["slide"]["level_read"] == 1, "the coarsest level still finer than the model's 1 µm/px"
    dimensions, mpp, labels = _levels(tmp_path / "TCGA-CR-7395-01A-01-TS1" / "mask.ome.tif")
    assert dimensions[0] == (1111, 892) and mpp == pytest.approx(1.0)
    assert 0.5 < (labels != 255).mean() < 0.75


def _segment_command(slide: Path, model: Path, out: Path) -> list[str]:
    options = ["--engine", "local", "--no-crf", "--tile", "128", "--halo", "32"]
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "segment",
        str(slide),
        "--model",
        str(model),
        "--out",
        str(out),
        *options,
    ]


@pytest.mark.slow
def test_killed_slide_run_resumes_to_the_same_mask(
    cmu_slide: Path, slide_model: Path, tmp_path: Path
) -> None:
    """Through the tiny model with the slide model's metadata: what is proven is the slide's path through
    staging, the ledger and the pyramid, not what the mask holds."""
    root = Path(__file__).resolve().parents[1]
    tiny = tiny_like(slide_model, tmp_path / "tiny-at-1um.safetensors")
    reference, resumed = resume_after_kill(
        lambda out: _segment_command(cmu_slide, tiny, out),
        "CMU-1-Small-Region",
        "mask.ome.tif",
        tmp_path,
        root,
    )
    expected = _levels(reference / "mask.ome.tif")
    dimensions, mpp, labels = _levels(resumed / "mask.ome.tif")
    assert dimensions == expected[0] and mpp == expected[1]
    assert np.array_equal(labels, expected[2])


def test_a_slide_without_tissue_gives_an_empty_valid_mask(slide_model: Path, tmp_path: Path) -> None:
    import tifffile

    glass = np.full((1024, 768, 3), (236, 234, 238), dtype=np.uint8)
    glass[100:110, 50:700] = (30, 60, 190)  # a pen line on the glass, no tissue
    path = tmp_path / "blank.ome.tif"
    tifffile.imwrite(
        path,
        glass,
        photometric="rgb",
        tile=(256, 256),
        resolution=(2e4, 2e4),  # 0.5 µm/px, as tiffslide reads it
        resolutionunit="CENTIMETER",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    options = SegmentOptions(engine="local", crf=False, vectorize=True)
    assert run_batch(path, slide_model, tmp_path / "out", options).exit_code == 0
    folder = tmp_path / "out" / "blank.ome"
    report = json.loads((folder / "report.json").read_text())
    assert report["tiles"]["computed"] == 0 and report["tiles"]["skipped"] == report["tiles"]["total"] > 0
    assert report["warnings"][-1] == f"{path}: no tissue found; the mask is empty (all nodata)"
    assert report["tissue_area_mm2"] == 0.0 and report["background_cores_share"] == 1.0
    dimensions, mpp, labels = _levels(folder / "mask.ome.tif")
    assert dimensions[0] == (384, 512) and mpp == pytest.approx(1.0) and (labels == 255).all()
    assert json.loads((folder / "polygons.geojson").read_text())["features"] == []
