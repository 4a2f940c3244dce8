"""Multi-scale inputs stored in a checkpoint: evaluate and tune-tiling choose them, segment runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rasterio

from models.checkpoint import read_metadata, update_metadata
from models.metadata import InputScales
from pipeline.cli import main
from pipeline.engine.grid import model_halo
from pipeline.engine.manifest import config_hash
from pipeline.engine.options import SegmentOptions
from pipeline.engine.plan import as_planned, plan_scene
from pipeline.io.readers import describe
from tests.conftest import kampala_card
from tests.test_segment import _segment
from tests.test_tiling import _chips_and_a_model_copy

# config_hash(SegmentOptions()) as every manifest recorded it while scales and fuse defaulted to (1,), max
HASH_BEFORE_STORED_SCALES = "a31411298a38e503"


def test_scales_come_from_the_options_then_the_checkpoint_then_one_alone(buildings_model: Path) -> None:
    metadata = read_metadata(buildings_model)
    assert metadata.input_scales is None and metadata.multiscale() == InputScales(scales=(1.0,), fuse="max")
    stored = metadata.model_copy(update={"input_scales": InputScales(scales=(0.75, 1.0), fuse="mean")})
    assert stored.multiscale() == InputScales(scales=(0.75, 1.0), fuse="mean")
    assert stored.multiscale((1.0,)) == InputScales(scales=(1.0,), fuse="mean")
    assert stored.multiscale(None, "max") == InputScales(scales=(0.75, 1.0), fuse="max")
    assert InputScales(scales=(0.5, 1.0), fuse="mean").describe() == "scales 0.5, 1 fused by mean"
    for bad in ((0.0,), (1.0, 1.0), (5.0,)):
        with pytest.raises(ValueError, match="scales"):
            InputScales(scales=bad)


def test_a_smaller_scale_widens_the_halo_of_a_model_that_can_tile_exactly(buildings_v2_model: Path) -> None:
    """Shrunk by 0.5, each window pixel spans two scene pixels: the receptive field reaches twice as far."""
    metadata = read_metadata(buildings_v2_model)
    assert model_halo(metadata, None, 2048, min_scale=0.5) > model_halo(metadata, None, 2048) > 0
    assert model_halo(metadata, None, 2048, min_scale=2.0) == model_halo(metadata, None, 2048)


def test_unset_scales_keep_the_manifest_keys_of_the_values_they_stand_for(
    landsat: Path, buildings_model: Path, tmp_path: Path
) -> None:
    scene = describe(landsat)
    plain = read_metadata(buildings_model)

    def key(metadata: Any, options: SegmentOptions) -> str:
        # the 300 m scene through the 7.5 cm model: let through (a runtime option, outside the key)
        let_through = options.model_copy(update={"force_resolution": True})
        return config_hash(as_planned(options, plan_scene(scene, metadata, let_through)))

    # a checkpoint without stored scales: the nightly flow's keys are those of the manifests before
    assert key(plain, SegmentOptions(tile=256)) == key(
        plain, SegmentOptions(tile=256, scales=(1.0,), fuse="max")
    )
    assert key(plain, SegmentOptions()) == HASH_BEFORE_STORED_SCALES
    stored = plain.model_copy(update={"input_scales": InputScales(scales=(0.75, 1.0), fuse="mean")})
    assert key(stored, SegmentOptions()) == key(plain, SegmentOptions(scales=(0.75, 1.0), fuse="mean"))
    assert key(stored, SegmentOptions()) != key(stored, SegmentOptions(scales=(1.0,)))


def test_evaluate_saves_its_scales_and_segment_runs_them(
    kampala: Path, landsat: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks, model = _chips_and_a_model_copy(kampala, buildings_model, tmp_path)
    args = ["evaluate", "--model", str(model), "--images", str(images), "--masks", str(masks), "--tile", "64"]
    report_path = tmp_path / "report.json"

    def no_crf(*extra: str) -> dict[str, Any]:
        assert main([*args, "--report", str(report_path), *extra]) == 0
        return dict(json.loads(report_path.read_text())["no_crf"])

    plain = no_crf()
    assert (plain["scales"], plain["fuse"]) == ([1.0], "max")
    multi = no_crf("--scales", "0.75", "1", "--fuse", "mean", "--save-scales")
    assert (multi["scales"], multi["fuse"]) == ([0.75, 1.0], "mean") and multi["miou"] != plain["miou"]
    assert read_metadata(model).input_scales == InputScales(scales=(0.75, 1.0), fuse="mean")
    assert no_crf()["miou"] == multi["miou"]  # the stored scales are evaluate's default now
    assert no_crf("--fuse", "max")["miou"] != multi["miou"]
    capsys.readouterr()
    assert main([*args, "--save-scales"]) == 2
    assert "--save-scales needs" in capsys.readouterr().err
    assert main([*args, "--scales", "0", "1"]) == 2
    assert "--scales: scales must lie in 0.1-4 (got 0, 1)" in capsys.readouterr().err

    card = kampala_card(model, tmp_path)
    assert "runs each window at scales 0.75, 1 fused by mean unless told otherwise" in card

    # segment runs the stored scales, says so in its report and tags; what is asked wins: a new result
    out = tmp_path / "out"
    assert _segment(landsat, model, out, "--no-crf", "--engine", "local") == 0
    report = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert (report["scales"], report["fuse"]) == ([0.75, 1.0], "mean") and report["tiles"]["computed"] >= 1
    with rasterio.open(out / "RGB.byte" / "mask.tif") as mask:
        assert (mask.tags()["DEEPLAB_SCALES"], mask.tags()["DEEPLAB_FUSE"]) == ("0.75,1", "mean")
        multi_labels = mask.read(1)
    assert _segment(landsat, model, out, "--no-crf", "--engine", "local", "--scales", "1") == 0
    again = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert again["scales"] == [1.0] and again["tiles"]["computed"] == report["tiles"]["computed"]
    with rasterio.open(out / "RGB.byte" / "mask.tif") as mask:
        assert (mask.read(1) != multi_labels).any()


def test_tune_tiling_chooses_core_size_and_scales_together(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    images, masks, model = _chips_and_a_model_copy(kampala, buildings_model, tmp_path)
    args = ["tune-tiling", "--model", str(model), "--images", str(images), "--masks", str(masks)]
    assert main([*args, "--tiles", "32", "64", "--cores-per-window", "1", "--scales", "1", "0.5,1"]) == 0
    metadata = read_metadata(model)
    tuning = metadata.tiling_tuning
    assert tuning is not None
    # whole images for reference, then every core size at every scale set (max, the default fusion)
    tried = [
        (t["tiling"] if t["tiling"] == "whole image" else t["tiling"]["tile"], t["scales"])
        for t in tuning["trials"]
    ]
    assert tried == [("whole image", [1.0]), (32, [1.0]), (64, [1.0]), (32, [0.5, 1.0]), (64, [0.5, 1.0])]
    assert {t["fuse"] for t in tuning["trials"]} == {"max"}
    tiled = tuning["trials"][1:]
    best = max(tiled, key=lambda t: (round(t["miou"], 4), -len(t["scales"]), t["tiling"]["tile"]))
    assert tuning["best"] == best["tiling"] and tuning["best_miou"] == best["miou"]
    assert metadata.input_scales == InputScales(scales=tuple(best["scales"]), fuse="max")
    assert metadata.tiling is not None and metadata.tiling.tile == best["tiling"]["tile"]
    # without --scales the stored scales are left as they are and the tiling is tuned at them
    update_metadata(model, input_scales=InputScales(scales=(0.5, 1.0), fuse="mean"))
    assert main([*args, "--tiles", "64", "--cores-per-window", "1"]) == 0
    again = read_metadata(model)
    assert again.input_scales == InputScales(scales=(0.5, 1.0), fuse="mean")
    assert {(tuple(t["scales"]), t["fuse"]) for t in again.tiling_tuning["trials"]} == {((0.5, 1.0), "mean")}  # type: ignore[index]
