"""A scene given as an HTTP URL (read by GDAL over byte ranges, identified by one HEAD request)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import rasterio

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
        assert f"sha256:{source_sha256(url)}" == local.report.input_identity
        # the server sends no ETag: the object is known by its size and last-modified time
        identity = Manifest(tmp_path).input_identity(url)
        assert identity.startswith("modified:") and identity.endswith(f";size:{chip.stat().st_size}")
        (remote,) = run_batch(url, buildings_model, tmp_path / "remote", options).results.values()
    assert remote.report.scene == url and remote.report.input_identity == identity
    with rasterio.open(remote.mask) as far, rasterio.open(local.mask) as near:
        assert np.array_equal(far.read(), near.read()) and far.profile == near.profile
        # only the tags that name the input differ: its identity is a HEAD's answer, not a content hash
        assert {k: v for k, v in far.tags().items() if k != "DEEPLAB_INPUT"} == {
            k: v for k, v in near.tags().items() if k != "DEEPLAB_INPUT"
        }
