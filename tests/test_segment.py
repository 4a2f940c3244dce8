from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from pipeline.cli import main
from pipeline.engine.grid import core_of, cores_to_compute, plan_tiles
from pipeline.engine.workers import window_batches


def test_plan_covers_the_scene_once() -> None:
    tiles = plan_tiles(1000, 700, 256, 32)
    cover = np.zeros((1000, 700), int)
    for tile in tiles:
        cover[
            tile.core_top : tile.core_top + tile.core_height,
            tile.core_left : tile.core_left + tile.core_width,
        ] += 1
    assert (cover == 1).all()
    assert len(tiles) == 4 * 3


def test_windows_stay_inside_the_scene_and_crop_back_to_their_cores() -> None:
    height, width, tile, halo = 1000, 700, 256, 64
    scene = np.arange(height * width).reshape(1, height, width)
    for t in plan_tiles(height, width, tile, halo):
        top, left, win_h, win_w = t.window
        assert top >= 0 and left >= 0 and top + win_h <= height and left + win_w <= width
        # a full halo where the scene has room for it, none beyond the scene
        assert t.core_top - top == min(halo, t.core_top)
        assert left + win_w - (t.core_left + t.core_width) == min(halo, width - t.core_left - t.core_width)
        window = scene[:, top : top + win_h, left : left + win_w]
        core = scene[:, t.core_top : t.core_top + t.core_height, t.core_left : t.core_left + t.core_width]
        np.testing.assert_array_equal(core_of(window, t), core)
    assert plan_tiles(100, 90, 512, 256)[0].window == (0, 0, 100, 90)  # a small scene is one window


def test_blocks_of_cores_share_one_window_with_at_least_the_halo_around_each_core() -> None:
    height, width, tile, halo = 1000, 700, 128, 64
    scene = np.arange(height * width).reshape(1, height, width)
    tiles = plan_tiles(height, width, tile, halo, cores_per_window=3)
    assert [(t.core_top, t.core_left) for t in tiles] == [
        (t.core_top, t.core_left) for t in plan_tiles(height, width, tile, halo)
    ]
    by_window: dict[tuple[int, int, int, int], list[tuple[int, int]]] = {}
    for t in tiles:
        by_window.setdefault(t.window, []).append((t.row, t.col))
        top, left, win_h, win_w = t.window
        assert top >= 0 and left >= 0 and top + win_h <= height and left + win_w <= width
        assert t.core_top - top >= min(halo, t.core_top)
        assert top + win_h - t.core_top - t.core_height >= min(halo, height - t.core_top - t.core_height)
        window = scene[:, top : top + win_h, left : left + win_w]
        core = scene[:, t.core_top : t.core_top + t.core_height, t.core_left : t.core_left + t.core_width]
        np.testing.assert_array_equal(core_of(window, t), core)
    # 8 x 6 cores in blocks of 3 x 3: 3 x 2 windows, the last row of blocks two cores tall
    assert len(by_window) == 3 * 2
    assert by_window[tiles[0].window] == [(r, c) for r in range(3) for c in range(3)]
    assert (
        max(len(cores) for cores in by_window.values()) == 9 and min(len(c) for c in by_window.values()) == 6
    )


def test_blocks_shrink_to_the_cores_with_valid_pixels() -> None:
    """A block with one valid core reads that core's own window (nodata collars, slides' background)."""
    height = width = 512
    valid = np.zeros((height, width), bool)
    valid[:256, :256] = True  # the whole first block
    valid[300, 300] = True  # one pixel in the core at (2, 2) of the second block on the diagonal
    blocked = plan_tiles(height, width, 128, 64, cores_per_window=2)
    single = {(t.row, t.col): t.window for t in plan_tiles(height, width, 128, 64)}
    todo, skipped = cores_to_compute(blocked, valid)
    assert skipped == 16 - 5
    windows = {(t.row, t.col): t.window for t, _ in todo}
    assert windows[(2, 2)] == single[(2, 2)]
    assert {windows[(r, c)] for r in range(2) for c in range(2)} == {(0, 0, 320, 320)}
    # resumed: the cores already done do not change the others' windows
    resumed, _ = cores_to_compute(blocked, valid, lambda row, col: (row, col) == (0, 0))
    assert {(t.row, t.col): t.window for t, _ in resumed} == {k: v for k, v in windows.items() if k != (0, 0)}


def test_window_batches_read_each_window_once_and_bound_the_cores_per_batch() -> None:
    tiles = plan_tiles(1000, 700, 128, 64, cores_per_window=2)
    todo = [(t, None) for t in tiles if (t.row, t.col) != (0, 1)]  # one core of the first block done
    batches = window_batches(todo, 4)
    windows = [members[0][0].window for batch in batches for members in batch]
    assert len(windows) == len(set(windows)) == len({t.window for t in tiles})
    assert sorted((t.row, t.col) for batch in batches for m in batch for t, _ in m) == sorted(
        (t.row, t.col) for t, _ in todo
    )
    for batch in batches:
        assert len({members[0][0].window[2:] for members in batch}) == 1  # one shape: a stackable batch
        assert sum(len(m) for m in batch) <= 4 or len(batch) == 1
        assert all(t.window == members[0][0].window for members in batch for t, _ in members)


def _segment(scene: Path, model: Path, out: Path, *extra: str) -> int:
    """The nodata and engine tests run the Landsat scene (300 m) through the 7.5 cm building model: a model
    that does not fit it, so preflight is told to let it through (a runtime option: keys are unchanged)."""
    common = ["--tile", "256", "--halo", "32", "--force-resolution"]
    return main(["segment", str(scene), "--model", str(model), "--out", str(out), *common, *extra])


@pytest.mark.slow
def test_landsat_scene_keeps_georeferencing_and_nodata(
    landsat: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _segment(landsat, tiny_buildings_model, out) == 0
    mask_path = out / "RGB.byte" / "mask.tif"
    with rasterio.open(landsat) as source, rasterio.open(mask_path) as mask:
        assert mask.crs == source.crs and mask.crs.to_epsg() == 32618
        assert mask.transform == source.transform
        assert (mask.height, mask.width) == (source.height, source.width)
        assert mask.nodata == 255 and mask.dtypes[0] == "uint8"
        labels = mask.read(1)
        valid = source.dataset_mask() > 0
        assert (labels[~valid] == 255).all()
        assert np.isin(labels[valid], [0, 1]).all()
        assert mask.colormap(1)[1][:3] == (227, 26, 28)
        tags = mask.tags()
        assert tags["DEEPLAB_CHECKPOINT_SHA256"] and tags["DEEPLAB_MODEL"].startswith("deeplab")
    assert cog_validate(str(mask_path)) == (True, [], []), "a valid COG, without warnings"
    report = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert report["tiles"]["total"] == 12
    assert report["tiles"]["skipped"] >= 1  # corner cores of the rotated footprint hold no data
    assert report["tiles"]["computed"] + report["tiles"]["skipped"] == 12
    assert report["crs"] == "EPSG:32618"
    counted = sum(report["class_pixels"].values())
    assert counted == int(valid.sum())
    assert sum(report["class_areas_m2"].values()) == pytest.approx(counted * 300.0379 * 300.0417, rel=1e-3)
    assert (out / "RGB.byte" / "quicklook.png").stat().st_size > 1000
    published = [p for p in (out / "RGB.byte").iterdir()]
    assert sorted(p.name for p in published) == ["item.json", "mask.tif", "quicklook.png", "report.json"]

    # Running again skips the unchanged scene: its outputs are left as they are.
    before = mask_path.read_bytes()
    stamp = mask_path.stat().st_mtime_ns
    assert _segment(landsat, tiny_buildings_model, out) == 0
    assert mask_path.stat().st_mtime_ns == stamp
    # With an output gone, the scene is published again from its ledger: nothing is computed, same bytes.
    mask_path.unlink()
    assert _segment(landsat, tiny_buildings_model, out) == 0
    again = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert again["tiles"]["computed"] == 0 and again["tiles"]["resumed"] == report["tiles"]["computed"]
    assert mask_path.read_bytes() == before

    # The local engine runs the same workers in one process: the same mask, byte for byte.
    local = tmp_path / "local"
    assert _segment(landsat, tiny_buildings_model, local, "--engine", "local") == 0
    assert (local / "RGB.byte" / "mask.tif").read_bytes() == before


@pytest.mark.slow
def test_scene_context_is_computed_once_and_shared_by_both_engines(
    landsat: Path, buildings_model: Path, tmp_path: Path
) -> None:
    """``--context scene`` on Ray: a first pass over every core gives the scene's pooled features (kept beside
    the ledger), then every window uses them; a re-run reuses them, the local engine gives the same bytes."""
    out = tmp_path / "out"
    assert _segment(landsat, buildings_model, out, "--no-crf", "--context", "scene") == 0
    report = json.loads((out / "RGB.byte" / "report.json").read_text())
    assert report["context"] == "scene" and report["tiles"]["computed"] >= 1
    # both passes ran on the same actor: the model was loaded once
    assert report["cluster"]["actors_started"] == {"model": 1}
    saved = json.loads((out / ".work" / "RGB.byte" / "context.json").read_text())
    context = np.asarray(saved["context"])
    assert context.shape == (1, 320) and np.isfinite(context).all() and context.any()
    mask = (out / "RGB.byte" / "mask.tif").read_bytes()

    (out / "RGB.byte" / "mask.tif").unlink()  # else the unchanged scene is skipped whole
    assert _segment(landsat, buildings_model, out, "--no-crf", "--context", "scene") == 0
    assert json.loads((out / "RGB.byte" / "report.json").read_text())["tiles"]["computed"] == 0
    assert (out / "RGB.byte" / "mask.tif").read_bytes() == mask

    local = tmp_path / "local"
    assert (
        _segment(landsat, buildings_model, local, "--no-crf", "--context", "scene", "--engine", "local") == 0
    )
    assert (local / "RGB.byte" / "mask.tif").read_bytes() == mask


@pytest.mark.slow
def test_a_batch_shares_its_actors_and_a_bad_scene_does_not_stop_it(
    landsat: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    """The scenes of one `deeplab segment` share the session's actors (one model load for the batch); a scene
    that fails is reported, the others are published, the exit code says something failed."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    first, second, broken = scenes / "a.tif", scenes / "b.tif", scenes / "c.tif"
    first.write_bytes(landsat.read_bytes())
    second.write_bytes(landsat.read_bytes())
    broken.write_text("not a GeoTIFF")
    out = tmp_path / "out"
    command = ["segment", str(first), str(broken), str(second), "--model", str(tiny_buildings_model)]
    command += ["--force-resolution"]
    assert main([*command, "--out", str(out), "--tile", "256", "--halo", "32", "--no-crf"]) != 0
    reports = [json.loads((out / name / "report.json").read_text()) for name in ("a", "b")]
    assert reports[0]["cluster"]["actors_started"] == {"model": 1}
    assert reports[1]["cluster"]["actors_started"] == {}  # the first scene's actor, model loaded already
    assert reports[1]["tiles"]["computed"] == reports[0]["tiles"]["computed"] > 0
    assert not (out / "c").exists()
    with rasterio.open(out / "a" / "mask.tif") as a, rasterio.open(out / "b" / "mask.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
