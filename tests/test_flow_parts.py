"""The flow's pieces without a server: discovery, result keys, the manifest, deployments, artifacts, logs."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from deeplab_common.errors import DataError, UnreadableManifest
from flows.artifacts import artifact_key, batch_table, thumbnail_data_url
from flows.serve import PREFECT_FILE, ServeConfig, render_deployments
from flows.settings import TELEMETRY_OFF, prefect_environment, worker_environment
from flows.task_progress import TaskLogProgress
from pipeline.engine.manifest import Manifest, SceneKey, SceneRecord, config_hash
from pipeline.engine.options import SegmentOptions
from pipeline.io.discover import discover_scenes, duplicate_ids


def test_discovery_of_folders_globs_and_lists(tmp_path: Path) -> None:
    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "b.TIFF").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.tif").write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mask.tif").write_bytes(b"x")

    assert discover_scenes(str(tmp_path)) == [tmp_path / "a.tif", tmp_path / "b.TIFF"]
    recursive = discover_scenes(f"{tmp_path}/**/*.tif", exclude=out)
    assert recursive == [tmp_path / "a.tif", tmp_path / "sub" / "c.tif"], "the output folder is not searched"
    named = discover_scenes([str(out / "mask.tif")], exclude=out)
    assert named == [out / "mask.tif"], "a file named explicitly is a scene, wherever it lies"
    listed = discover_scenes([str(tmp_path / "notes.txt"), str(tmp_path / "a.tif"), str(tmp_path)])
    assert listed == [tmp_path / "a.tif", tmp_path / "b.TIFF", tmp_path / "notes.txt"], "unique, sorted"
    assert discover_scenes(str(tmp_path / "missing.tif")) == [tmp_path / "missing.tif"], "fails in preflight"
    with pytest.raises(DataError, match="no-such-folder: no such file or folder"):
        discover_scenes(str(tmp_path / "no-such-folder"))
    with pytest.raises(DataError, match=r"\*\.jp2: the glob names no raster file"):
        discover_scenes(f"{tmp_path}/*.jp2")  # a nightly pointed at the wrong place fails loudly


def test_scenes_with_one_id_are_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "x" / "s.tif", tmp_path / "y" / "s.tif"
    clashes = duplicate_ids([first, second, tmp_path / "t.tif"])
    assert list(clashes) == [first, second], "every scene of a clash is refused, not only the later ones"
    assert clashes[first] == clashes[second], "one line names them all"
    assert (
        "same scene id 's'" in clashes[first]
        and str(first) in clashes[first]
        and str(second) in clashes[first]
    )


def test_config_hash_changes_with_results_not_with_runtime_options() -> None:
    base = config_hash(SegmentOptions())
    assert config_hash(SegmentOptions(engine="local", max_in_flight=2, batch_size=1, device="cpu")) == base
    assert config_hash(SegmentOptions(keep_warm_s=600)) == base, "warm actors compute the same masks"
    for changed in (SegmentOptions(crf=False), SegmentOptions(tile=256), SegmentOptions(probabilities=True)):
        assert config_hash(changed) != base


def test_manifest_skips_only_current_complete_results(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    key = SceneKey(input_identity="in", checkpoint_sha256="ckpt", config="cfg")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mask.tif").write_bytes(b"m")
    record = SceneRecord(
        source="/data/s.tif",
        scene_id="s",
        outcome="done",
        key=key,
        outputs={"mask": "s/mask.tif"},
        finished="t",
    )
    assert manifest.current("/data/s.tif", key) is None
    manifest.record_scene(record)
    assert manifest.current("/data/s.tif", key) == record
    assert (
        manifest.current(
            "/data/s.tif", SceneKey(input_identity="changed", checkpoint_sha256="ckpt", config="cfg")
        )
        is None
    )
    manifest.record_scene(
        SceneRecord(source="/data/s.tif", scene_id="s", outcome="failed", key=key, message="boom")
    )
    assert manifest.current("/data/s.tif", key) == record, "a failure never replaces the last good result"
    (tmp_path / "s" / "mask.tif").unlink()
    assert manifest.current("/data/s.tif", key) is None, "a deleted output is redone"
    manifest.record_run({"outcome": "failed"}, [record])
    assert manifest.read()["runs"][0]["scenes"][0]["scene_id"] == "s"


def test_manifest_identity_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    scene = tmp_path / "in" / "s.tif"
    scene.parent.mkdir()
    scene.write_bytes(b"abc")
    manifest = Manifest(tmp_path / "out")
    first = manifest.input_identity(scene)
    cached = manifest.read()["checksums"][str(scene)]
    assert first == f"sha256:{cached['sha256']}"
    # Same size and mtime: the cache answers without reading (a rewrite that keeps both is not seen,
    # unless the run verifies its inputs).
    stat = scene.stat()
    scene.write_bytes(b"xyz")
    os.utime(scene, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert manifest.input_identity(scene) == first
    assert manifest.input_identity(scene, verify=True) == f"sha256:{hashlib.sha256(b'xyz').hexdigest()}"
    scene.write_bytes(b"abcd")
    assert manifest.input_identity(scene) != first


def test_unreadable_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UnreadableManifest, match=r"manifest.json: unreadable manifest"):
        Manifest(tmp_path).read()


def test_committed_deployments_and_overrides() -> None:
    committed = yaml.safe_load(PREFECT_FILE.read_text())
    by_name = {d["name"]: d for d in committed["deployments"]}
    assert by_name["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert by_name["on-demand"]["schedules"] == []
    assert {d["entrypoint"] for d in by_name.values()} == {"flows/segment_scenes.py:segment_scenes"}

    config = ServeConfig(
        work_dir=Path("w"),
        pool="gpu-pool",
        cron="30 1 * * *",
        timezone="Asia/Tokyo",
        parameters={"input": "/x"},
    )
    rendered = {d["name"]: d for d in render_deployments(config)["deployments"]}
    assert rendered["nightly"]["schedules"] == [
        {"cron": "30 1 * * *", "timezone": "Asia/Tokyo", "active": True}
    ]
    assert rendered["on-demand"]["schedules"] == []
    assert {d["work_pool"]["name"] for d in rendered.values()} == {"gpu-pool"}
    assert rendered["nightly"]["parameters"]["input"] == "/x"
    assert rendered["nightly"]["parameters"]["output"] == "published", "the rest stay prefect.yaml's"


def test_prefect_environment_is_private_and_quiet(tmp_path: Path) -> None:
    env = prefect_environment(tmp_path, "http://127.0.0.1:1/api", base={"DO_NOT_TRACK": "0"})
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["DO_NOT_TRACK"] == "0", "a user's explicit choice is kept"
    assert set(TELEMETRY_OFF) <= set(env)


def test_ray_workers_get_the_server_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    monkeypatch.setenv("PREFECT_API_KEY", "secret")
    env = worker_environment()
    assert env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert "PREFECT_API_KEY" not in env, "no secrets in a Ray runtime env"


def test_batch_table_and_artifact_keys(tmp_path: Path) -> None:
    key = SceneKey(input_identity="i", checkpoint_sha256="c", config="f")
    tiles = {"computed": 3, "skipped": 1, "resumed": 0}
    records = [
        SceneRecord(source="/a.tif", scene_id="a", outcome="done", key=key, tiles=tiles, seconds=2.5),
        SceneRecord(
            source="/b.tif",
            scene_id="b",
            outcome="skipped",
            key=key,
            message="unchanged since t",
            tiles={"computed": 0},
            seconds=0.0,
        ),
        SceneRecord(source="/c.tif", scene_id="c", outcome="failed", message="/c.tif: not a | raster"),
    ]
    table = batch_table(records, {"/a.tif": {"background": 20000.0, "building": 5000.0}})
    assert "| a | done | 3 / 1 / 0 | background 2.00 ha, building 0.50 ha | 2.5 |" in table
    assert "| c | failed | – | – | – | /c.tif: not a \\| raster |" in table
    assert table.endswith("3 scenes: 1 segmented, 1 unchanged and skipped, 1 failed.")
    slide = batch_table(records[:1], {"/a.tif": {"stroma": 0.4e-6, "nuclei": 0.05e-6}})
    assert "stroma 0.400 mm², nuclei 0.050 mm²" in slide
    assert artifact_key("OAM_1238456 Scene.v2") == "oam-1238456-scene-v2"
    picture = tmp_path / "q.png"
    Image.new("RGB", (1000, 500), (10, 20, 30)).save(picture)
    url = thumbnail_data_url(picture)
    assert url.startswith("data:image/png;base64,") and len(url) < 20_000


def test_task_log_progress_reports_tenths(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test-progress")
    progress = TaskLogProgress(logger)
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.stage("s", "segment", "20 cores to compute")
        done = progress.cores("s", 20)
        for _ in range(20):
            done()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "s: segment (20 cores to compute)"
    counts = [line.split(": ")[1].split(" ")[0] for line in lines[1:]]
    assert counts == [f"{n}/20" for n in range(2, 21, 2)], "one line per tenth, the last one included"


def test_serve_beyond_loopback_requires_prefect_auth(tmp_path: Path) -> None:
    """The Prefect API runs flows on the worker: opened beyond this machine only behind credentials."""
    from deeplab_common.errors import ConfigError
    from flows.serve import ServeConfig, check_exposure
    from flows.settings import prefect_environment

    check_exposure(ServeConfig(work_dir=tmp_path), {})  # loopback, the default: nothing needed
    check_exposure(ServeConfig(work_dir=tmp_path, host="::1"), {})
    with pytest.raises(ConfigError, match="PREFECT_SERVER_API_AUTH_STRING"):
        check_exposure(ServeConfig(work_dir=tmp_path, host="0.0.0.0"), {})
    with pytest.raises(ConfigError, match=r"--host prefect\.internal"):
        check_exposure(ServeConfig(work_dir=tmp_path, host="prefect.internal"), {})
    check_exposure(ServeConfig(work_dir=tmp_path, host="0.0.0.0"), {"PREFECT_SERVER_API_AUTH_STRING": "u:p"})
    env = prefect_environment(tmp_path, "http://127.0.0.1:1/api", {"PREFECT_SERVER_API_AUTH_STRING": "u:p"})
    assert env["PREFECT_API_AUTH_STRING"] == "u:p", "the project's own clients answer the server"
