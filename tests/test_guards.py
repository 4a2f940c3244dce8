"""The engine's guards, one by one: the output folder's lock and debris, writes kept inside --out, disk
space, --max-pixels, failure lines and logs (Ray's wrapping undone), NaN staging, durable atomic output."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deeplab_common.atomic import PARTIAL_PREFIX, _read_umask, atomic_output
from deeplab_common.errors import (
    OutOfSpace,
    OutputBusy,
    OutputFolderError,
    OutsideOutputFolder,
    SceneRefused,
)
from pipeline.crf import refine
from pipeline.engine.failures import failure_line, log_failure, root_cause
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import LOCK_NAME, clean_debris, inside, output_folder, output_lock
from pipeline.engine.space import bytes_needed, check_fits
from pipeline.engine.stage import finite_only


def test_a_second_holder_waits_or_is_refused_and_is_told_who_holds_it(tmp_path: Path) -> None:
    said: list[str] = []
    with output_lock(tmp_path / "out"):
        with (
            pytest.raises(OutputBusy, match=f"pid {os.getpid()}") as refused,
            output_lock(tmp_path / "out", wait=False),
        ):
            pass
        assert refused.value.exit_code == 3
        got = threading.Event()

        def second() -> None:
            with output_lock(tmp_path / "out", wait=True, on_wait=said.append):
                got.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert not got.is_set(), "the second holder waits while the first holds the folder"
    waiter.join(timeout=10)
    assert got.is_set() and said and "waiting for it" in said[0]
    assert (tmp_path / "out" / LOCK_NAME).is_file(), "the lock file stays: removing it would race"


def test_debris_of_a_dead_run_is_removed_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    kept = [out / "scene" / "mask.tif", out / ".work" / "scene" / "labels.zarr" / "c" / "0" / "0"]
    debris = [
        out / f"{PARTIAL_PREFIX}manifest.json.abc.json",
        out / f"{PARTIAL_PREFIX}scene" / "mask.tif",
        out / "scene" / f"{PARTIAL_PREFIX}stage-x" / "raster.tif",
        out / ".work" / "scene" / f"{PARTIAL_PREFIX}staging" / "image.zarr" / "zarr.json",
        out / ".work" / "ray-abcd1234" / "session_latest",
    ]
    for path in kept + debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = clean_debris(out)
    assert all(path.exists() for path in kept)
    assert not any(path.exists() for path in debris)
    assert len(removed) == len(debris)


def test_writes_stay_inside_the_output_folder(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "scene").symlink_to(elsewhere)
    assert inside(out, out / "other" / "mask.tif") == (out / "other" / "mask.tif").resolve()
    with pytest.raises(OutsideOutputFolder, match="outside the output folder"):
        inside(out, out / "scene" / "mask.tif")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        output_folder(tmp_path / "file")


def test_failure_lines_unwrap_ray_errors_and_logs_keep_the_traceback(tmp_path: Path) -> None:
    from ray.exceptions import RayTaskError

    scene = tmp_path / "scene.tif"
    try:
        raise ValueError("buffer source array is read-only")
    except ValueError as cause:
        wrapped = RayTaskError("CRFActor.refine_core", "\x1b[31mremote traceback\x1b[0m", cause)
    try:
        raise wrapped.as_instanceof_cause()  # as ray.get raises it
    except ValueError as error:
        raised = error
    assert root_cause(raised) is wrapped.cause
    line = failure_line(scene, "segment", raised)
    assert line == f"{scene}: segment failed: ValueError: buffer source array is read-only"
    log = log_failure(tmp_path / "out", scene, "segment", raised)
    assert log == tmp_path / "out" / ".logs" / "scene.log"
    text = log.read_text()
    assert line in text and "Traceback" in text and "remote traceback" in text and "\x1b[" not in text
    assert log_failure(tmp_path / "out", tmp_path / "..tif", "stage", raised) is None, "no id, no log"


def test_a_scene_that_cannot_fit_the_disk_is_refused_with_both_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, scene = (1000, 2000), Path("/data/scene.tif")
    # staged bands + valid mask + labels (and confidence) with their overviews
    assert bytes_needed(shape, 4, "uint16", False) == 2_000_000 * (8 + 1) + int(2_000_000 * (1 + 4 / 3))
    assert bytes_needed(shape, 4, "uint16", True) > bytes_needed(shape, 4, "uint16", False)
    monkeypatch.setattr("pipeline.engine.space.bytes_free", lambda folder: 10_000_000)
    with pytest.raises(OutOfSpace, match=r"/data/scene.tif: needs up to 21\.6 MiB .* but 9\.5 MiB is free"):
        check_fits(scene, shape, 4, "uint16", tmp_path, False)
    # what an interrupted run already staged for the scene counts as available again
    (tmp_path / ".work" / "scene").mkdir(parents=True)
    (tmp_path / ".work" / "scene" / "staged").write_bytes(b"x" * 13_000_000)
    check_fits(scene, shape, 4, "uint16", tmp_path, False)


def test_max_pixels_refuses_in_preflight(landsat: Path, landcover_model: Path) -> None:
    from models.checkpoint import checkpoint_info
    from pipeline.engine.plan import plan_scene
    from pipeline.io.readers import describe

    metadata = checkpoint_info(landcover_model).metadata
    scene = describe(landsat)
    plan_scene(scene, metadata, SegmentOptions(max_pixels=791 * 718))
    with pytest.raises(SceneRefused, match=r"791x718 = 567938 pixels, over --max-pixels 500000"):
        plan_scene(scene, metadata, SegmentOptions(max_pixels=500_000))


def test_nan_and_inf_samples_become_nodata() -> None:
    block = np.ones((3, 4, 4), np.float32)
    block[0, 0, 0], block[2, 1, 1], block[1, 3, 3] = np.nan, np.inf, -np.inf
    valid = np.ones((4, 4), bool)
    valid[3, 3] = False  # already nodata: not counted again
    assert finite_only(block, valid) == 2
    assert np.isfinite(block).all() and not valid[0, 0] and not valid[1, 1] and valid.sum() == 13
    integers = np.ones((3, 2, 2), np.uint8)
    assert finite_only(integers, np.ones((2, 2), bool)) == 0


def test_the_crf_takes_a_read_only_one_pixel_window() -> None:
    """Ray hands windows over read-only; for one pixel, moveaxis gives back that same buffer."""
    image = np.zeros((3, 1, 1), np.uint8)
    image.setflags(write=False)
    probabilities = np.full((2, 1, 1), 0.5, np.float32)
    assert refine(probabilities, image).shape == (2, 1, 1)


def test_atomic_output_is_all_or_nothing_and_keeps_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_output(target) as temp:
        assert temp.name.startswith(PARTIAL_PREFIX)
        temp.write_text("whole")
    assert target.read_text() == "whole"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_read_umask()
    mask = os.umask(0o027)
    try:
        assert _read_umask() == 0o027, "read from /proc, not set and reset"
    finally:
        os.umask(mask)


def test_an_out_that_is_a_file_is_a_usage_error(
    landsat: Path, landcover_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    taken = tmp_path / "out.tif"
    taken.write_text("a file, not a folder")
    assert main(["segment", str(landsat), "--model", str(landcover_model), "--out", str(taken)]) == 2
    printed = capsys.readouterr()
    assert "is a file, not a folder" in printed.out + printed.err
    assert "Traceback" not in printed.out + printed.err
    assert taken.read_text() == "a file, not a folder"
