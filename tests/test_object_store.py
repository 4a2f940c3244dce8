"""Scenes read in place from an S3-API server (moto's, started on loopback): listings, identity by ETag, the
same masks as local files, and one plain line for what goes wrong remotely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bench.s3_server import free_port, s3_server
from deeplab_common.errors import UnreachableObject
from pipeline.engine.driver import run_batch
from pipeline.engine.options import SegmentOptions
from pipeline.io import objects
from pipeline.io.discover import discover_scenes
from pipeline.io.readers import describe
from pipeline.io.sources import source_identity
from tests.conftest import kampala_chip

STEMS = ("OAM-1238456-1046532-21", "OAM-1238457-1046532-21")
LOCAL = SegmentOptions(engine="local", crf=False)


def test_object_urls_and_their_gdal_names() -> None:
    url = objects.ObjectUrl.parse("s3://bucket/in/a.tif")
    assert (url.bucket, url.key, url.gdal_path) == ("bucket", "in/a.tif", "/vsis3/bucket/in/a.tif")
    assert objects.ObjectUrl.parse("/vsis3/bucket/in/a.tif") == url
    assert objects.ObjectUrl.parse("/vsigs/b/k.tif").url == "gs://b/k.tif"
    assert objects.ObjectUrl.parse("abfs://c/k.tif").gdal_path == "/vsiaz/c/k.tif"
    https = objects.ObjectUrl.parse("/vsicurl/https://host/x/y.tif")
    assert (https.base, https.key, https.gdal_path) == (
        "https://host",
        "x/y.tif",
        "/vsicurl/https://host/x/y.tif",
    )
    assert not objects.is_object_url("/vsizip/a.zip/b.tif") and not objects.is_object_url("ftp://h/a.tif")
    assert objects.is_listing("s3://b/in/") and objects.is_listing("s3://b/**/*.tif")
    assert not objects.is_listing("s3://b/in/a.tif")


def test_globs_match_as_in_a_shell() -> None:
    deep = objects._glob_regex("in/**/*.tif")
    assert deep.fullmatch("in/a.tif") and deep.fullmatch("in/2026/12/a.tif")
    assert not deep.fullmatch("in/a.tiff") and not deep.fullmatch("out/a.tif")
    flat = objects._glob_regex("in/scene-?[0-9].tif")
    assert flat.fullmatch("in/scene-a1.tif") and not flat.fullmatch("in/x/scene-a1.tif")


def test_gdal_gets_the_endpoint_under_its_own_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    options = objects.gdal_options()
    assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and options["AWS_HTTPS"] == "NO"
    assert options["AWS_VIRTUAL_HOSTING"] == "FALSE" and options["AZURE_STORAGE_ACCOUNT"] == "acct"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")  # the S3-only variable wins
    assert objects.gdal_options()["AWS_S3_ENDPOINT"] == "s3.example.org"
    assert objects.gdal_options()["AWS_HTTPS"] == "YES"
    assert int(objects.gdal_options()["GDAL_HTTP_MAX_RETRY"]) == objects.MAX_RETRIES


def _upload_chips(s3: object, kampala: Path, prefix: str) -> list[str]:
    return [
        s3.upload(s3.bucket, f"{prefix}{stem}.tif", kampala_chip(kampala, stem)[0])  # type: ignore[attr-defined]
        for stem in STEMS
    ]


def test_a_prefix_and_a_glob_list_the_rasters(s3: object, kampala: Path, tmp_path: Path) -> None:
    urls = _upload_chips(s3, kampala, "incoming/2026-12-01/")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a raster")
    s3.upload(s3.bucket, "incoming/2026-12-01/notes.txt", notes)  # type: ignore[attr-defined]
    s3.upload(s3.bucket, "incoming/top.tif", kampala_chip(kampala)[0])  # type: ignore[attr-defined]
    bucket = f"s3://{s3.bucket}"  # type: ignore[attr-defined]
    assert discover_scenes(f"{bucket}/incoming/2026-12-01/") == sorted(urls)
    assert discover_scenes(f"{bucket}/incoming/") == [f"{bucket}/incoming/top.tif"]  # a folder's own files
    assert discover_scenes(f"{bucket}/**/*-21.tif") == sorted(urls)
    assert discover_scenes(f"/vsis3/{s3.bucket}/incoming/*.tif") == [f"/vsis3/{s3.bucket}/incoming/top.tif"]  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="no raster objects"):
        discover_scenes(f"{bucket}/nothing-here/")


def test_scenes_in_a_bucket_give_the_local_masks_and_skip_by_etag(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    urls = _upload_chips(s3, kampala, "in/")
    local_folder = tmp_path / "local-in"
    local_folder.mkdir()
    for stem in STEMS:
        shutil.copy(kampala_chip(kampala, stem)[0], local_folder)
    local = run_batch(local_folder, tiny_buildings_model, tmp_path / "local", LOCAL)
    remote = run_batch(f"s3://{s3.bucket}/in/", tiny_buildings_model, tmp_path / "remote", LOCAL)  # type: ignore[attr-defined]
    assert [r.outcome for r in remote.records] == ["done", "done"]
    for stem, url in zip(STEMS, urls, strict=True):
        mine, theirs = tmp_path / "remote" / stem / "mask.tif", tmp_path / "local" / stem / "mask.tif"
        with rasterio.open(mine) as a, rasterio.open(theirs) as b:
            assert np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs
        report = json.loads((tmp_path / "remote" / stem / "report.json").read_text())
        assert report["scene"] == url and report["input_identity"].startswith("etag:")
        assert report["input_identity"] == objects.head(url).identity
    assert local.records[0].key is not None and local.records[0].key.input_identity.startswith("sha256:")

    again = run_batch(f"s3://{s3.bucket}/in/", tiny_buildings_model, tmp_path / "remote", LOCAL)  # type: ignore[attr-defined]
    assert [r.outcome for r in again.records] == ["skipped", "skipped"]

    # the same key, new content: a new ETag, so the scene is redone, never taken for the old one
    s3.upload(s3.bucket, f"in/{STEMS[0]}.tif", kampala_chip(kampala, "OAM-1238448-1046528-21")[0])  # type: ignore[attr-defined]
    replaced = run_batch(f"s3://{s3.bucket}/in/", tiny_buildings_model, tmp_path / "remote", LOCAL)  # type: ignore[attr-defined]
    assert [r.outcome for r in replaced.records] == ["done", "skipped"]


def test_verify_inputs_hashes_the_whole_object(s3: object, kampala: Path) -> None:
    (url, _) = _upload_chips(s3, kampala, "v/")
    digest = __import__("hashlib").sha256(kampala_chip(kampala, STEMS[0])[0].read_bytes()).hexdigest()
    assert source_identity(url, verify=True) == f"sha256:{digest}"
    assert source_identity(url).startswith("etag:")


def test_a_slide_in_a_bucket_is_read_in_place(s3: object, cmu_slide: Path) -> None:
    url = s3.upload(s3.bucket, "slides/CMU-1-Small-Region.svs", cmu_slide)  # type: ignore[attr-defined]
    remote, local = describe(url), describe(cmu_slide)
    assert remote.format == "slide" and remote.path == url
    assert remote.slide is not None and local.slide is not None
    assert (
        remote.slide.level_dimensions == local.slide.level_dimensions and remote.slide.mpp == local.slide.mpp
    )
    from pipeline.io.readers import open_blocks

    with open_blocks(remote, 1.0) as far, open_blocks(local, 1.0) as near:
        assert np.array_equal(far.read_block(512, 512, 256, 256), near.read_block(512, 512, 256, 256))


def test_what_goes_wrong_remotely_is_one_line_naming_the_scene(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (good, _) = _upload_chips(s3, kampala, "ok/")
    missing = f"s3://{s3.bucket}/ok/missing.tif"  # type: ignore[attr-defined]
    no_bucket = "s3://no-such-bucket-here/x.tif"
    batch = run_batch([good, missing, no_bucket], tiny_buildings_model, tmp_path / "out", LOCAL)
    outcomes = {r.source: r for r in batch.records}
    assert outcomes[good].outcome == "done"
    for url in (missing, no_bucket):
        line = outcomes[url].message.split(" (details:")[0]
        assert outcomes[url].outcome == "failed" and url in line and "\n" not in line
        assert "no such object" in line or "NoSuchBucket" in line or "not found" in line.lower()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # moto checks no signature: deny by policy instead
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UnreachableObject, match="did not answer") as refused:
        objects.head(good)
    assert good in str(refused.value) and "\n" not in str(refused.value)


def test_access_denied_is_one_line_and_the_batch_goes_on(
    kampala: Path, tiny_buildings_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that checks credentials (after the two requests that set up its bucket): the scene in it
    fails with one line, signed or anonymous, and the local scene beside it is segmented."""
    local = kampala_chip(kampala)[0].resolve()  # as discovery names it (../shared may be a link)
    with s3_server(tmp_path / "moto.log", unauthenticated_actions=2) as server:
        server.create_bucket("locked")
        url = server.upload("locked", "x.tif", local)
        for name, value in server.environment.items():
            monkeypatch.setenv(name, value)
        batch = run_batch([url, local], tiny_buildings_model, tmp_path / "out", LOCAL)
        monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
        with pytest.raises(UnreachableObject, match="anonymous request"):
            objects.head(url)
    outcome = {r.source: r for r in batch.records}
    assert outcome[str(local)].outcome == "done" and outcome[url].outcome == "failed"
    line = outcome[url].message.split(" (details:")[0]
    assert line.startswith(f"{url}: access denied") and "\n" not in line


def test_outputs_in_a_bucket_are_published_whole_and_resume_from_any_machine(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    """Scenes from a bucket into a bucket: every output, the manifest, the catalog and index.html land
    under the prefix, with the pixels of a local run; a re-run from a new scratch folder (another machine)
    skips every scene by the bucket's manifest and listing; no lock is left behind."""
    import pystac

    _upload_chips(s3, kampala, "in/")
    bucket = f"s3://{s3.bucket}"  # type: ignore[attr-defined]
    out = f"{bucket}/results/nightly"
    first = run_batch(
        f"{bucket}/in/", tiny_buildings_model, out, LOCAL.model_copy(update={"scratch": str(tmp_path / "a")})
    )
    assert [r.outcome for r in first.records] == ["done", "done"]
    published = objects.list_tree(out)
    for stem in STEMS:
        assert {
            f"{stem}/{name}" for name in ("mask.tif", "quicklook.png", "report.json", "item.json")
        } <= set(published)
    assert {"manifest.json", "catalog.json", "index.html"} <= set(published) and ".lock.json" not in published
    catalog = pystac.Catalog.from_dict(json.loads(objects.get_bytes(f"{out}/catalog.json")))
    assert sorted(link.target for link in catalog.get_item_links()) == [f"./{s}/item.json" for s in STEMS]
    local = run_batch(f"{bucket}/in/", tiny_buildings_model, tmp_path / "local", LOCAL)
    scratch_mask = tmp_path / "b" / "mask.tif"
    scratch_mask.parent.mkdir()
    scratch_mask.write_bytes(objects.get_bytes(f"{out}/{STEMS[0]}/mask.tif"))
    with rasterio.open(scratch_mask) as a, rasterio.open(tmp_path / "local" / STEMS[0] / "mask.tif") as b:
        assert np.array_equal(a.read(), b.read())
    assert local.records[0].outcome == "done"

    from models.checkpoint import checkpoint_info
    from pipeline.engine.driver import Batch

    dry = LOCAL.model_copy(update={"scratch": str(tmp_path / "dry")})
    planned = Batch(out, checkpoint_info(tiny_buildings_model), dry).plan(f"{bucket}/in/")
    assert [getattr(p, "outcome", None) for p in planned] == ["skipped", "skipped"]  # the dry run knows too
    elsewhere = LOCAL.model_copy(update={"scratch": str(tmp_path / "c")})
    again = run_batch(f"{bucket}/in/", tiny_buildings_model, out, elsewhere)
    assert [r.outcome for r in again.records] == ["skipped", "skipped"]
    runs = json.loads(objects.get_bytes(f"{out}/manifest.json"))["runs"]
    assert [run["outcome"] for run in runs] == ["completed", "completed"]


def test_a_scene_republished_without_an_output_loses_it_in_the_bucket(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    (url, _) = _upload_chips(s3, kampala, "in/")
    out = f"s3://{s3.bucket}/out"  # type: ignore[attr-defined]
    scratch = {"scratch": str(tmp_path / "s")}
    run_batch(url, tiny_buildings_model, out, LOCAL.model_copy(update=scratch | {"probabilities": True}))
    assert f"{STEMS[0]}/probabilities.tif" in objects.list_tree(out)
    run_batch(url, tiny_buildings_model, out, LOCAL.model_copy(update=scratch))
    keys = set(objects.list_tree(out))
    assert f"{STEMS[0]}/probabilities.tif" not in keys and f"{STEMS[0]}/mask.tif" in keys


def test_one_writer_per_prefix_and_a_dead_runs_lock_is_taken_over(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    import time

    from deeplab_common.errors import OutputBusy

    (url, _) = _upload_chips(s3, kampala, "in/")
    out = f"s3://{s3.bucket}/locked"  # type: ignore[attr-defined]
    held = {"owner": "pid 1 on elsewhere", "renewed": "now", "expires_unix": time.time() + 600}
    s3.store(s3.bucket).put("locked/.lock.json", json.dumps(held).encode())  # type: ignore[attr-defined]
    options = LOCAL.model_copy(update={"scratch": str(tmp_path / "s"), "wait": False})
    with pytest.raises(OutputBusy, match="pid 1 on elsewhere"):
        run_batch(url, tiny_buildings_model, out, options)
    dead = held | {"expires_unix": time.time() - 1}  # its run died a lease ago
    s3.store(s3.bucket).put("locked/.lock.json", json.dumps(dead).encode())  # type: ignore[attr-defined]
    assert run_batch(url, tiny_buildings_model, out, options).records[0].outcome == "done"
    assert ".lock.json" not in objects.list_tree(out)


def test_a_run_killed_while_writing_a_bucket_resumes_and_loses_nothing(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL mid-compute (no cleanup of any kind): nothing of the scene is in the bucket, its lock is
    left; the next run waits out the dead run's lease, takes the prefix over and resumes the cores on
    record in its scratch folder."""
    import os
    import signal
    import subprocess
    import sys

    from deeplab_common.faults import CRASH_ENV
    from pipeline.engine.lease import LEASE_ENV

    (url, _) = _upload_chips(s3, kampala, "in/")
    out = f"s3://{s3.bucket}/killed"  # type: ignore[attr-defined]
    monkeypatch.setenv(LEASE_ENV, "1")
    scratch = tmp_path / "scratch"
    command = [sys.executable, "-m", "pipeline.cli", "segment", url, "--model", str(tiny_buildings_model)]
    command += ["--out", out, "--engine", "local", "--no-crf", "--tile", "128", "--scratch", str(scratch)]
    crashed = subprocess.run(command, capture_output=True, env=os.environ | {CRASH_ENV: "ledger-core:2"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    left = objects.list_tree(out)
    assert ".lock.json" in left and not [key for key in left if key.startswith(STEMS[0])]
    resumed = run_batch(
        url, tiny_buildings_model, out, LOCAL.model_copy(update={"scratch": str(scratch), "tile": 128})
    )
    assert resumed.records[0].outcome == "done"
    report = json.loads(objects.get_bytes(f"{out}/{STEMS[0]}/report.json"))
    assert report["tiles"]["resumed"] == 2 and report["tiles"]["computed"] == 2
    assert ".lock.json" not in objects.list_tree(out)


def test_a_slide_from_a_bucket_into_a_bucket_from_the_command_line(
    s3: object, cmu_slide: Path, tiny_slide_model: Path, tmp_path: Path
) -> None:
    """The CLI, a slide read in place and published with its probabilities to the bucket: the pixels of the
    same run on the local file."""
    from pipeline.cli.parser import main

    url = s3.upload(s3.bucket, "slides/CMU-1-Small-Region.svs", cmu_slide)  # type: ignore[attr-defined]
    out = f"s3://{s3.bucket}/slides-out"  # type: ignore[attr-defined]
    flags = ["--model", str(tiny_slide_model), "--engine", "local", "--no-crf", "--probabilities"]
    assert main(["segment", url, "--out", out, "--scratch", str(tmp_path / "s"), *flags]) == 0
    assert main(["segment", str(cmu_slide), "--out", str(tmp_path / "local"), *flags]) == 0
    scene = "CMU-1-Small-Region"
    local = sorted(p.name for p in (tmp_path / "local" / scene).iterdir() if p.is_file())
    published = objects.list_tree(out)
    assert {f"{scene}/{name}" for name in local} <= set(published)
    for name in ("mask.ome.tif", "probabilities.ome.tif"):
        far = tmp_path / f"far-{name}"
        far.write_bytes(objects.get_bytes(f"{out}/{scene}/{name}"))
        with rasterio.open(far) as ours, rasterio.open(tmp_path / "local" / scene / name) as theirs:
            assert np.array_equal(ours.read(), theirs.read())
    assert main(["segment", url, "--out", out, "--scratch", str(tmp_path / "t"), *flags]) == 0  # skipped
    runs = json.loads(objects.get_bytes(f"{out}/manifest.json"))["runs"]
    assert [scene["outcome"] for scene in runs[-1]["scenes"]] == ["skipped"]


def test_a_store_that_dies_mid_run_fails_the_scenes_left_in_one_line_each(
    s3: object, kampala: Path, tiny_buildings_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store stops answering after the first scene is published (a proxy in front of it dies at the
    second scene's first request after its preflight): the first scene is kept, the second fails with one
    line naming it, and the next run, with the store back, publishes it and skips the first."""
    from bench.s3_server import CountingProxy
    from pipeline.engine.driver import Batch
    from pipeline.engine.options import SegmentOptions as Options

    first_url, second_url = _upload_chips(s3, kampala, "in/")
    second_key = "/" + second_url.removeprefix("s3://")
    counting = CountingProxy(s3.endpoint)  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL", counting.endpoint)
    from models.checkpoint import checkpoint_info

    Batch(tmp_path / "out", checkpoint_info(tiny_buildings_model), Options(engine="local")).plan(
        f"s3://{s3.bucket}/in/"  # type: ignore[attr-defined]
    )  # the dry run: the requests preflight makes for the second scene
    before_staging = sum(1 for r in counting.reset() if r.path.startswith(second_key))
    counting.close()
    seen: list[str] = []

    def dies(method: str, path: str) -> bool:
        seen.extend([path] if path.startswith(second_key) else [])
        return len(seen) > before_staging

    dying = CountingProxy(s3.endpoint, die_when=dies)  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ENDPOINT_URL", dying.endpoint)
    batch = run_batch(f"s3://{s3.bucket}/in/", tiny_buildings_model, tmp_path / "out", LOCAL)  # type: ignore[attr-defined]
    dying.close()
    outcome = {r.source: r for r in batch.records}
    assert outcome[first_url].outcome == "done" and outcome[second_url].outcome == "failed"
    line = outcome[second_url].message.split(" (details:")[0]
    assert line.startswith(second_url) and "did not answer" in line and "\n" not in line
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # type: ignore[attr-defined]
    again = run_batch(f"s3://{s3.bucket}/in/", tiny_buildings_model, tmp_path / "out", LOCAL)  # type: ignore[attr-defined]
    assert {r.source: r.outcome for r in again.records} == {first_url: "skipped", second_url: "done"}
