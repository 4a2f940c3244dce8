"""Remote inputs, counted on the store's side of the wire (moto's S3 server behind a counting proxy, both on
loopback): what a nightly re-run over unchanged objects costs the store, and what segmenting a large COG in
place reads from it against downloading it first, measured in the same run.

    python bench/remote.py                       # 200 unchanged scenes, a 16384 x 16384 COG
    python bench/remote.py --scenes 20 --size 4096

Writes bench/reports/remote.json and remote.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

from bench.reporting import machine, write_report
from bench.s3_server import KEYS, CountingProxy, Request, s3_server
from models.tiny_like import tiny_like

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
CHIP = DATA / "kampala-buildings" / "chips" / "OAM-1238456-1046532-21.tif"
SCENE = DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"


def _summary(requests: list[Request], prefix: str, scenes: int) -> dict[str, Any]:
    """What the requests under ``/bucket/prefix`` cost: counts by method, bytes, whole-object GETs."""
    mine = [r for r in requests if r.path.split("?")[0].startswith(prefix)]
    methods = Counter(r.method for r in mine)
    return {
        "requests": len(mine),
        "requests_per_scene": round(len(mine) / max(scenes, 1), 2),
        "by_method": dict(methods),
        "object_bytes_read": sum(r.body_bytes for r in mine if r.method == "GET" and "?" not in r.path),
        "listing_bytes": sum(r.body_bytes for r in mine if r.method == "GET" and "?" in r.path),
        "whole_object_gets": sum(1 for r in mine if r.method == "GET" and not r.ranged and "?" not in r.path),
    }


def nightly(server: Any, proxy: CountingProxy, model: Path, scenes: int, work: Path) -> dict[str, Any]:
    """``scenes`` objects segmented once, then again unchanged: what the second run costs."""
    from pipeline.engine.driver import run_batch
    from pipeline.engine.options import SegmentOptions

    store = server.store("bench")
    data = CHIP.read_bytes()
    for index in range(scenes):
        import obstore

        obstore.put(store, f"nightly/scene-{index:04d}.tif", data)
    options = SegmentOptions(engine="local", crf=False)
    clock = time.perf_counter()
    first = run_batch("s3://bench/nightly/", model, work / "nightly-out", options)
    first_s = time.perf_counter() - clock
    assert all(r.outcome == "done" for r in first.records), [r.message for r in first.failed]
    first_cost = _summary(proxy.reset(), "/bench", scenes)
    clock = time.perf_counter()
    again = run_batch("s3://bench/nightly/", model, work / "nightly-out", options)
    again_s = time.perf_counter() - clock
    assert all(r.outcome == "skipped" for r in again.records)
    return {
        "scenes": scenes,
        "object_bytes": len(data),
        "first_run": first_cost | {"seconds": round(first_s, 2)},
        "unchanged_rerun": _summary(proxy.reset(), "/bench", scenes) | {"seconds": round(again_s, 2)},
    }


def _large_cog(size: int, path: Path) -> Path:
    """A ``size`` x ``size`` RGB JPEG COG tiled from the real Kampala scene (mirrored copies side by side)."""
    with rasterio.open(SCENE) as scene:
        pixels = scene.read()
        transform, crs = scene.transform, scene.crs
    reps = (1, -(-size // pixels.shape[1]), -(-size // pixels.shape[2]))
    mosaic = np.tile(pixels, reps)[:, :size, :size]
    profile = {
        "driver": "COG",
        "dtype": "uint8",
        "count": 3,
        "height": size,
        "width": size,
        "crs": crs,
        "transform": from_origin(transform.c, transform.f, transform.a, -transform.e),
        "compress": "jpeg",
        "quality": 90,
        "blocksize": 512,
        "overviews": "none",
    }
    with rasterio.open(path, "w", **profile) as cog:
        cog.write(mosaic)
    return path


def in_place(server: Any, proxy: CountingProxy, size: int, work: Path) -> dict[str, Any]:
    """Stage a large COG from the bucket in place (what preflight and staging read), against downloading
    it whole and staging the local copy."""
    import obstore

    from pipeline.engine.stage import stage_scene
    from pipeline.io import objects
    from pipeline.io.readers import describe

    cog = _large_cog(size, work / "large.tif")
    obstore.put(server.store("bench"), "large/large.tif", cog.read_bytes())
    size_bytes = cog.stat().st_size
    proxy.reset()
    clock = time.perf_counter()
    stage_scene(describe("s3://bench/large/large.tif"), work / "in-place", 512)
    in_place_s = time.perf_counter() - clock
    read = _summary(proxy.reset(), "/bench/large/", 1)
    clock = time.perf_counter()
    local = work / "downloaded.tif"
    local.write_bytes(objects.get_bytes("s3://bench/large/large.tif"))
    stage_scene(describe(local), work / "downloaded", 512)
    download_s = time.perf_counter() - clock
    downloaded = _summary(proxy.reset(), "/bench/large/", 1)
    return {
        "size_px": size,
        "object_bytes": size_bytes,
        "in_place": read | {"seconds": round(in_place_s, 2)},
        "download_then_read": downloaded | {"seconds": round(download_s, 2)},
        "bytes_ratio_in_place": round(read["object_bytes_read"] / size_bytes, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--size", type=int, default=16384)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeplab-remote-") as folder:
        work = Path(folder)
        with s3_server(work / "moto.log") as server:
            server.create_bucket("bench")
            proxy = CountingProxy(server.endpoint)
            os.environ.update(KEYS | {"AWS_ENDPOINT_URL": proxy.endpoint})
            try:
                model = tiny_like(
                    ROOT / "models" / "zoo" / "buildings-kampala.safetensors", work / "tiny.safetensors"
                )
                result = {
                    "machine": machine(),
                    "nightly": nightly(server, proxy, model, args.scenes, work),
                    "large_cog": in_place(server, proxy, args.size, work),
                }
            finally:
                proxy.close()
    night, large = result["nightly"], result["large_cog"]
    rerun = night["unchanged_rerun"]
    lines = [
        "# Remote inputs, counted by the store",
        "",
        f"Machine: {result['machine']}. moto's S3 server behind a counting proxy, both on loopback.",
        "",
        f"## A nightly re-run over {night['scenes']} unchanged objects",
        "",
        "| run | requests | per scene | by method | object bytes read | listing bytes | whole-object GETs "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("first_run", "unchanged_rerun"):
        run = night[name]
        cells = [name.replace("_", " "), run["requests"], run["requests_per_scene"], run["by_method"]]
        cells += [f"{run['object_bytes_read']:,}", f"{run['listing_bytes']:,}", run["whole_object_gets"]]
        cells.append(run["seconds"])
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        f"The re-run read {rerun['object_bytes_read']:,} bytes of objects and {rerun['listing_bytes']:,} "
        f"bytes of the prefix's listing, with {rerun['requests_per_scene']} requests a scene (the listing "
        f"included) and {rerun['whole_object_gets']} GET of a whole object: scenes are known by their ETag "
        "and size.",
        "",
        f"## Staging a {large['size_px']}² COG ({large['object_bytes']:,} bytes) in place",
        "",
        "| how | requests | object bytes read | seconds |",
        "|---|---|---|---|",
        f"| in place (range requests) | {large['in_place']['requests']} | "
        f"{large['in_place']['object_bytes_read']:,} | {large['in_place']['seconds']} |",
        f"| download, then read | {large['download_then_read']['requests']} | "
        f"{large['download_then_read']['object_bytes_read']:,} | {large['download_then_read']['seconds']} |",
        "",
        f"In place read {large['bytes_ratio_in_place']}x the object's size.",
    ]
    write_report("remote", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
