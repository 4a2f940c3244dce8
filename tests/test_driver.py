"""The one batch driver behind `deeplab segment`, the flow and the RayJob: folders, id clashes, a broken
scene among good ones, exit codes, and the RayJob's own command line on a local Ray cluster."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import yaml
from rasterio.windows import Window

from pipeline.cli import main
from pipeline.engine.failures import failure_line
from pipeline.ray.local_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--tile", "128", "--halo", "32", "--no-crf", "--engine", "local"]


def _crop(scene: Path, out: Path, top: int, left: int, size: int = 256) -> Path:
    """A georeferenced crop of ``scene`` (a small, real scene the model fits)."""
    with rasterio.open(scene) as source:
        window = Window(left, top, size, size)
        profile = {
            "driver": "GTiff",
            "count": source.count,
            "dtype": source.dtypes[0],
            "crs": source.crs,
            "nodata": source.nodata,
            "height": size,
            "width": size,
            "transform": source.window_transform(window),
            "tiled": True,
            "blockxsize": 128,
            "blockysize": 128,
            "compress": "deflate",
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **profile) as sink:
            sink.write(source.read(window=window))
    return out


def _kampala_scene(data_dir: Path) -> Path:
    return data_dir / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"


def _segment(*argv: str) -> int:
    return main(["segment", *argv])


@pytest.mark.slow
def test_a_folder_of_two_scenes_gives_two_masks_and_a_rerun_skips_both(
    data_dir: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "incoming"
    scene = _kampala_scene(data_dir)
    _crop(scene, folder / "north.tif", 0, 0)
    _crop(scene, folder / "south.tif", 512, 256)
    (folder / "notes.txt").write_text("not a scene: left out of the folder's scenes")
    out = tmp_path / "out"
    assert _segment(str(folder), "--model", str(buildings_model), "--out", str(out), *FAST) == 0
    for name in ("north", "south"):
        with rasterio.open(out / name / "mask.tif") as mask:
            assert mask.shape == (256, 256) and mask.crs is not None
    # the CLI records the run in the manifest as the flow does: a second run skips the unchanged scenes
    capsys.readouterr()
    assert _segment(str(folder), "--model", str(buildings_model), "--out", str(out), *FAST) == 0
    printed = capsys.readouterr().err
    assert printed.count("unchanged since") == 2, printed


@pytest.mark.slow
def test_two_scenes_with_one_id_are_refused_before_any_work(
    data_dir: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = _kampala_scene(data_dir)
    first = _crop(scene, tmp_path / "a" / "x.tif", 0, 0)
    second = _crop(scene, tmp_path / "b" / "x.tif", 256, 0)
    other = _crop(scene, tmp_path / "a" / "y.tif", 0, 256)
    out = tmp_path / "out"
    argv = [str(first), str(second), str(other), "--model", str(buildings_model), "--out", str(out), *FAST]
    assert _segment(*argv) == 1
    refusals = [line for line in capsys.readouterr().err.splitlines() if "same scene id 'x'" in line]
    assert len(refusals) == 1, "one line for the clash"
    assert str(first) in refusals[0] and str(second) in refusals[0]
    assert not (out / "x").exists() and not (out / ".work" / "x").exists(), "nothing of either ran"
    assert (out / "y" / "mask.tif").is_file(), "the other scene went on"


@pytest.mark.slow
def test_scene_ids_that_would_write_outside_the_output_folder_are_refused(
    data_dir: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`...tif` has the id `..` and `..tif` the id `.`: their outputs would go above `--out` or into it."""
    scene = _kampala_scene(data_dir)
    above = _crop(scene, tmp_path / "in" / "...tif", 0, 0)
    itself = _crop(scene, tmp_path / "in" / "..tif", 0, 256)
    good = _crop(scene, tmp_path / "in" / "good.tif", 256, 0)
    out = tmp_path / "runs" / "out"
    argv = [str(above), str(itself), str(good), "--model", str(buildings_model), "--out", str(out), *FAST]
    assert _segment(*argv) == 1
    failures = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
    assert len(failures) == 2 and all("would write outside the output folder" in f for f in failures)
    assert str(above) in failures[0] + failures[1] and str(itself) in failures[0] + failures[1]
    assert (out / "good" / "mask.tif").is_file(), "the other scene went on"
    written = {p.name for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert not (tmp_path / "runs" / "mask.tif").exists() and not (out / "mask.tif").exists()
    assert "report.json" in written


def test_scene_id_problems() -> None:
    from pipeline.io.sources import scene_id_problem, source_id

    assert scene_id_problem(Path("/data/x.tif")) is None
    assert (
        scene_id_problem("s3://bucket/a/scene.tif") is None
        and source_id("s3://bucket/a/scene.tif") == "scene"
    )
    for bad in (Path("/data/...tif"), Path("/data/..tif"), "https://host/", "s3://bucket/x/..tif"):
        assert scene_id_problem(bad), bad
    assert scene_id_problem(Path("/data/a\x01b.tif")), "control characters"


def _corrupt_tiles(scene: Path, out: Path) -> Path:
    """A COG of ``scene`` whose header (IFDs first, as a COG has them) is intact and whose tile data is cut
    off half-way: it opens and describes itself, then fails when its pixels are read."""
    whole = out.with_suffix(".whole.tif")
    rasterio.shutil.copy(scene, whole, driver="COG", compress="deflate", blocksize=128)
    data = whole.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    whole.unlink()
    return out


@pytest.mark.slow
def test_a_scene_with_corrupt_tiles_fails_alone_in_one_line(
    data_dir: Path, buildings_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scene = _kampala_scene(data_dir)
    good = _crop(scene, tmp_path / "in" / "good.tif", 0, 0)
    bad = _corrupt_tiles(_crop(scene, tmp_path / "whole.tif", 0, 0, 512), tmp_path / "in" / "bad.tif")
    with rasterio.open(bad) as opened:  # the header is intact: only reading the pixels fails
        assert opened.shape == (512, 512)
    out = tmp_path / "out"
    assert _segment(str(bad), str(good), "--model", str(buildings_model), "--out", str(out), *FAST) == 1
    err = capsys.readouterr().err
    assert (out / "good" / "mask.tif").is_file(), "the good scene is published"
    failures = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failures) == 1 and str(bad) in failures[0], err
    assert "Traceback" not in err
    assert not (out / "bad" / "mask.tif").exists()


def test_failure_lines_name_the_file_and_the_stage() -> None:
    from deeplab_common.errors import DataError

    scene = Path("/data/x.tif")
    assert failure_line(scene, "stage", DataError(f"{scene}: not a raster")) == f"{scene}: not a raster"
    line = failure_line(scene, "stage", OSError("read failed\nsecond line"))
    assert line == f"{scene}: stage failed: OSError: read failed"
    assert failure_line(scene, "segment", DataError("probabilities contain NaN")).startswith(
        f"{scene}: segment failed: probabilities contain NaN"
    )


def test_usage_errors_exit_2(tmp_path: Path, buildings_model: Path) -> None:
    missing = tmp_path / "no-such-folder"
    assert _segment(str(missing), "--model", str(buildings_model), "--out", str(tmp_path / "o")) == 2
    with pytest.raises(SystemExit) as exit_info:
        _segment("--model", str(buildings_model))  # argparse: no scene, no --out
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_the_rayjob_entrypoint_publishes_a_folder_on_a_ray_cluster(
    data_dir: Path, buildings_model: Path, tmp_path: Path, ray_cluster: LocalRayCluster
) -> None:
    """`infra/k8s/rayjob.yaml`'s entrypoint, as written, with its paths mapped onto this machine, run as a
    Ray job's driver: RAY_ADDRESS names the cluster (as `ray job submit` sets it)."""
    manifest = yaml.safe_load((ROOT / "infra" / "k8s" / "rayjob.yaml").read_text())
    argv = shlex.split(manifest["spec"]["entrypoint"])
    scene = _kampala_scene(data_dir)
    incoming, published = tmp_path / "incoming", tmp_path / "published"
    _crop(scene, incoming / "tile-a.tif", 0, 0)
    _crop(scene, incoming / "tile-b.tif", 256, 256)
    paths = {
        "/data/incoming": str(incoming),
        "/data/published": str(published),
        "/opt/deeplab-pipeline/models/zoo/buildings-kampala.safetensors": str(buildings_model),
    }
    assert set(paths) <= set(argv), "the entrypoint still names these paths"
    argv = [paths.get(arg, arg) for arg in argv]
    assert argv[:2] == ["deeplab", "segment"]
    command = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", *argv[1:]]
    env = ray_cluster.client_env() | {"RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("tile-a", "tile-b"):
        with rasterio.open(published / name / "mask.tif") as mask:
            labels = mask.read(1)
        assert labels.shape == (256, 256) and np.isin(labels, [0, 1]).all()
        assert (published / name / "polygons.gpkg").is_file(), "--vectorize as the entrypoint asks"
    assert "tile-a" in (published / "manifest.json").read_text()
