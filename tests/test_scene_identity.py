"""A scene's identity across runs (issue 32): an id in --out belongs to the source and checkpoint that
published it, a published folder holds exactly its report's outputs, a VRT is keyed by what it reads and may
reach only local files, and no run writes under the user's home."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio

from tests.cli_runs import one_line_error, run_cli
from tests.conftest import kampala_chip

FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]
CHIPS = ("OAM-1238456-1046532-21", "OAM-1238448-1046528-21")


def _dated_folders(kampala: Path, root: Path) -> tuple[Path, Path]:
    """Two nights' folders, each with a different scene under the same file name."""
    scenes = []
    for night, stem in zip(("2026-12-01", "2026-12-02"), CHIPS, strict=True):
        (root / night).mkdir(parents=True)
        scenes.append(Path(shutil.copy(kampala_chip(kampala, stem)[0], root / night / "tile.tif")))
    return scenes[0], scenes[1]


def _segment(scene: Path | str, model: Path, out: Path, *flags: str) -> tuple[int, str]:
    given = ["segment", str(scene), "--model", str(model), "--out", str(out), *FAST, *flags]
    result = run_cli(*given, cwd=out.parent)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def test_one_id_from_two_folders_is_refused_not_replaced(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    first, second = _dated_folders(kampala, tmp_path)
    out = tmp_path / "out"
    assert _segment(first, tiny_buildings_model, out)[0] == 0
    mask = (out / "tile" / "mask.tif").read_bytes()

    code, printed = _segment(second, tiny_buildings_model, out)
    assert code == 1
    line = one_line_error(subprocess_result(code, printed), str(second), "holds the outputs of", str(first))
    assert "--replace" in line
    assert (out / "tile" / "mask.tif").read_bytes() == mask, "the first night's outputs are kept"

    code, printed = _segment(first, tiny_buildings_model, out)
    assert code == 0 and "unchanged since" in printed, "its owner is still the first night's file"

    code, printed = _segment(second, tiny_buildings_model, out, "--replace")
    assert code == 0, printed
    report = json.loads((out / "tile" / "report.json").read_text())
    with rasterio.open(second) as scene:
        assert report["shape"] == [scene.height, scene.width]
    code, printed = _segment(first, tiny_buildings_model, out)
    assert code == 1 and "unchanged" not in printed, "a replaced source is never taken for unchanged"
    one_line_error(subprocess_result(code, printed), str(first), "holds the outputs of", str(second))
    shutil.rmtree(out / "tile")  # the user removed them: the id protects nothing any more
    assert _segment(first, tiny_buildings_model, out)[0] == 0


def test_a_second_checkpoint_into_one_out_is_refused_unless_replace(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    from models.tiny_like import tiny_like

    other = tiny_like(tiny_buildings_model, tmp_path / "other.safetensors", seed=1)
    scene, _ = kampala_chip(kampala)
    out = tmp_path / "out"
    assert _segment(scene, tiny_buildings_model, out)[0] == 0
    code, printed = _segment(scene, other, out)
    assert code == 1
    one_line_error(
        subprocess_result(code, printed), "holds the outputs of another checkpoint", "--out per model"
    )
    code, printed = _segment(scene, other, out, "--replace")
    assert code == 0 and "16 tiles computed" in printed, printed
    assert _segment(scene, other, out)[1].count("unchanged since") == 1


def test_a_published_folder_holds_exactly_the_outputs_its_report_lists(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    scene, _ = kampala_chip(kampala)
    out = tmp_path / "out"
    assert _segment(scene, tiny_buildings_model, out, "--vectorize", "--probabilities")[0] == 0
    folder = out / scene.stem
    assert {"polygons.gpkg", "probabilities.tif"} <= {p.name for p in folder.iterdir()}
    assert _segment(scene, tiny_buildings_model, out, "--tile", "96")[0] == 0  # other options, fewer outputs
    report = json.loads((folder / "report.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(report["outputs"].values())
    assert not (folder / "polygons.gpkg").exists()


def test_a_vrt_is_keyed_by_its_sources_and_verify_inputs_reads_them(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    source = Path(shutil.copy(kampala_chip(kampala)[0], tmp_path / "source.tif"))
    vrt = tmp_path / "mosaic.vrt"
    _write_vrt(source, vrt)
    out = tmp_path / "out"
    assert _segment(vrt, tiny_buildings_model, out)[0] == 0
    stat = source.stat()
    with rasterio.open(source, "r+") as dataset:  # other pixels, the same size and mtime
        dataset.write(255 - dataset.read())
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    assert "unchanged since" in _segment(vrt, tiny_buildings_model, out)[1], (
        "the documented cache: size, mtime"
    )
    code, printed = _segment(vrt, tiny_buildings_model, out, "--verify-inputs")
    assert code == 0 and "16 tiles computed" in printed, "--verify-inputs hashes the VRT's source"
    source.touch()  # a changed mtime: hashed again without --verify-inputs
    with rasterio.open(source, "r+") as dataset:
        dataset.write(255 - dataset.read())
    code, printed = _segment(vrt, tiny_buildings_model, out)
    assert code == 0 and "16 tiles computed" in printed, "a VRT whose source changed is not unchanged"


def _write_vrt(source: Path, vrt: Path) -> None:
    with rasterio.open(source) as dataset:
        transform, crs, (height, width) = dataset.transform, dataset.crs, dataset.shape
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">'
        f"{source.name}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b in (1, 2, 3)
    )
    vrt.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.to_wkt()}</SRS>'
        f"<GeoTransform>{', '.join(str(v) for v in transform.to_gdal())}</GeoTransform>{bands}</VRTDataset>"
    )


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every request it gets (and has nothing to serve)."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            requests.append(f"HEAD {self.path}")
            self.send_response(404)
            self.end_headers()

        def do_GET(self) -> None:
            requests.append(f"GET {self.path}")
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()


def _vrt_of(path: Path, band: str) -> Path:
    path.write_text(
        '<VRTDataset rasterXSize="16" rasterYSize="16"><SRS>EPSG:4326</SRS>'
        "<GeoTransform>32.5, 0.000001, 0, 0.3, 0, -0.000001</GeoTransform>" + band * 3 + "</VRTDataset>"
    )
    return path


def test_a_scene_vrt_reaches_only_local_rasters(
    tiny_buildings_model: Path, tmp_path: Path, counting_server: tuple[str, list[str]]
) -> None:
    url, requests = counting_server
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    raw = _vrt_of(
        tmp_path / "raw.vrt",
        '<VRTRasterBand dataType="Byte" subClass="VRTRawRasterBand">'
        f"<SourceFilename>{secret}</SourceFilename>"
        "<ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>16</LineOffset></VRTRasterBand>",
    )
    remote_source = f"/vsicurl/{url}/scene.tif"
    remote = _vrt_of(
        tmp_path / "remote.vrt",
        f'<VRTRasterBand dataType="Byte"><SimpleSource><SourceFilename>{remote_source}</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>",
    )
    out = tmp_path / "out"
    code, printed = _segment(raw, tiny_buildings_model, out)
    assert code == 1
    one_line_error(subprocess_result(code, printed), str(raw), f"raw band reading '{secret}'", "refused")
    code, printed = _segment(remote, tiny_buildings_model, out)
    assert code == 1
    one_line_error(subprocess_result(code, printed), str(remote), remote_source, "--allow-remote-sources")
    assert requests == [], "refused before any request"
    assert not (out / "raw").exists() and not (out / "remote").exists()

    code, printed = _segment(remote, tiny_buildings_model, out, "--allow-remote-sources")
    assert code == 1 and requests, "allowed: the source is asked for"
    one_line_error(subprocess_result(code, printed), str(remote), remote_source)


def test_a_run_writes_nothing_under_home(kampala: Path, tiny_buildings_model: Path, tmp_path: Path) -> None:
    """ONNX Runtime's telemetry (a device id and a SQLite database under ~/.cache) is off."""
    home = tmp_path / "home"
    home.mkdir()
    scene, _ = kampala_chip(kampala)
    command = [
        sys.executable, "-m", "flows.cli", "segment", str(scene), "--model", str(tiny_buildings_model),
        "--out", str(tmp_path / "out"), *FAST, "--runtime", "onnxruntime",
    ]  # fmt: skip
    env = os.environ | {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / scene.stem / "report.json").read_text())
    assert report["runtime"] == "onnxruntime"
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def subprocess_result(code: int, printed: str) -> subprocess.CompletedProcess[str]:
    """A run's exit code and what it printed, as ``one_line_error`` reads them."""
    return subprocess.CompletedProcess(["deeplab"], code, "", printed)


def test_a_vrt_in_a_bucket_reads_its_bucket_and_no_local_file(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    """A VRT in object storage is fetched and read as a local one is: its sources beside it in the bucket are
    read, a file of the machine that reads it is refused."""
    chip = kampala_chip(kampala)[0]
    bucket = s3.bucket  # type: ignore[attr-defined]
    s3.upload(bucket, f"in/{chip.name}", chip)  # type: ignore[attr-defined]
    beside, local = tmp_path / "beside.vrt", tmp_path / "local.vrt"
    _write_vrt(chip, beside)  # relative to the VRT: the chip beside it in the bucket
    _write_vrt(chip, local)
    local.write_text(local.read_text().replace(f'relativeToVRT="1">{chip.name}', f'relativeToVRT="0">{chip}'))
    s3.upload(bucket, "in/beside.vrt", beside)  # type: ignore[attr-defined]
    s3.upload(bucket, "in/local.vrt", local)  # type: ignore[attr-defined]
    out = tmp_path / "out"
    code, printed = _segment(f"s3://{bucket}/in/local.vrt", tiny_buildings_model, out)
    assert code == 1
    one_line_error(subprocess_result(code, printed), "local.vrt", f"reads the local file {chip}", "refused")
    code, printed = _segment(f"s3://{bucket}/in/beside.vrt", tiny_buildings_model, out)
    assert code == 0, printed
    assert (out / "beside" / "mask.tif").is_file()
