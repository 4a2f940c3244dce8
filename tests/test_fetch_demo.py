"""The demo's inputs fetched from their origins, over a loopback HTTP server that serves the same files: the
hash pins hold, the Kampala scene is assembled to the published scene, and a file that is not the pinned
one is refused and never kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from deeplab_common.digest import file_sha256
from deeplab_common.errors import DataError
from pipeline.cli.parser import main
from pipeline.tools.fetch_demo import demo_files, fetch_demo, registry
from tests.http_range import serving


def _mirror(data_dir: Path, folder: Path) -> Path:
    """The origins' files laid out as ``<origin name>/<file>``, copied from ../shared/data."""
    for entry in registry()["files"]:
        source = data_dir / entry["to"]
        if not source.is_file():
            pytest.skip(f"real data not available: {source} is absent (expected ../shared/data)")
        (folder / entry["origin"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / entry["origin"] / entry["name"])
    return folder


def test_the_registry_pins_every_public_origin() -> None:
    files = demo_files()
    assert len(files) == 97 and all(len(f.sha256) == 64 for f in files)
    assert all(f.url.startswith("https://") for f in files)
    assert {f.to.split("/")[0] for f in files} == {"kampala-buildings", "wsi"}


def test_fetch_over_loopback_assembles_the_published_scene(data_dir: Path, tmp_path: Path) -> None:
    mirror = _mirror(data_dir, tmp_path / "origin")
    target = tmp_path / "data"
    with serving(mirror) as base:
        assert main(["fetch-demo", str(target), "--mirror", base]) == 0
        scene, slide = fetch_demo(target, base)  # a second fetch keeps what is there
    assert file_sha256(slide) == file_sha256(data_dir / "wsi" / "CMU-1-Small-Region.svs")
    published = data_dir / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"
    with rasterio.open(scene) as ours, rasterio.open(published) as theirs:
        assert np.array_equal(ours.read(), theirs.read())
        assert ours.transform.almost_equals(theirs.transform, precision=1e-12) and ours.crs == theirs.crs
        assert ours.profile["compress"] == theirs.profile["compress"]


def test_a_file_that_is_not_the_pinned_one_is_refused(data_dir: Path, tmp_path: Path) -> None:
    mirror = _mirror(data_dir, tmp_path / "origin")
    tampered = mirror / "openslide" / "CMU-1-Small-Region.svs"
    tampered.write_bytes(tampered.read_bytes()[:-1000])  # a truncated download, or a changed file
    target = tmp_path / "data"
    with (
        serving(mirror) as base,
        pytest.raises(DataError, match=r"CMU-1-Small-Region\.svs: refused") as refused,
    ):
        fetch_demo(target, base)
    assert "\n" not in str(refused.value)
    assert not (target / "wsi" / "CMU-1-Small-Region.svs").exists()
    with serving(mirror) as base:
        assert main(["fetch-demo", str(target), "--mirror", base]) == 2
