"""A scene given as a URL (read by GDAL over HTTP byte ranges, checksummed through fsspec)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.engine.driver import run_batch
from pipeline.engine.manifest import Manifest
from pipeline.engine.options import SegmentOptions
from pipeline.io.discover import discover_scenes
from pipeline.io.readers import describe
from pipeline.io.sources import as_source, source_id, source_sha256
from tests.conftest import kampala_chip
from tests.http_range import serving


def test_urls_stay_urls(tmp_path: Path) -> None:
    url = "s3://bucket/scenes/2026/scene-07.tif"
    assert as_source(url) == url and source_id(url) == "scene-07"
    assert as_source(str(tmp_path / "a.tif")) == tmp_path / "a.tif"
    assert source_id("/vsis3/bucket/x.tif") == "x"
    assert discover_scenes([url, "https://host/b.tif"]) == ["https://host/b.tif", url]


def test_a_scene_over_http_gives_the_local_mask(kampala: Path, buildings_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    chip = folder / "chip.tif"
    shutil.copy(kampala_chip(kampala)[0], chip)
    options = SegmentOptions(engine="local", crf=False)
    (local,) = run_batch(chip, buildings_model, tmp_path / "local", options).results.values()
    with serving(folder) as base:
        url = f"{base}/chip.tif"
        scene = describe(url)
        assert scene.path == url and scene.scene_id == "chip" and scene.crs is not None
        assert source_sha256(url) == Manifest(tmp_path).checksum(url) == local.report.input_sha256
        (remote,) = run_batch(url, buildings_model, tmp_path / "remote", options).results.values()
    assert remote.report.scene == url
    assert remote.mask.read_bytes() == local.mask.read_bytes()
