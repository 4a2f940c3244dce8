"""Benchmark of the large-scene engine: efficiency, memory, throughput, and MONAI's sliding window.

    python -m bench.engine [--sizes 2048 16384] [--model M] [--skip-monai]

(a) pipeline efficiency: model-only forward time over the same windows / the engine's time (no CRF);
(b) peak RSS of the driver and each actor for a small and a large scene (mosaics of real imagery);
(c) megapixels per second with and without the CRF (the CRF on the small scene);
(d) the same model, window and overlap through MONAI's sliding_window_inference: throughput and peak RSS.
Every figure is measured in the same run on the same machine; results go to bench/reports/engine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from bench.mosaic import mirrored
from deeplab_common.atomic import write_text_atomically
from models.runtime import CACHE_ENV, RUNTIMES
from pipeline.engine.grid import cores_to_compute, plan_tiles
from pipeline.engine.stage import StagedStores
from pipeline.engine.workers import ModelWorker, read_windows, window_batches
from pipeline.ray.local_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
SOURCE = DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"
MODEL = ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors"  # the compact model: comparable runs
REPORTS = ROOT / "bench" / "reports"


def make_mosaic(source: Path, out: Path, size: int, valid: int | None = None) -> Path:
    """A size x size GeoTIFF of the real scene mirrored edge to edge, written a band of rows at a time.

    ``valid``: only a centred valid x valid square holds data (an internal mask marks the rest nodata), so a
    huge scene exercises staging, the ledger and publishing at full size while the model runs on part of it.
    """
    if out.exists():
        return out
    with rasterio.open(source) as src:
        image = src.read()
        profile = src.profile | {
            "height": size,
            "width": size,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
            "photometric": "RGB",
        }
        profile.pop("jpeg_quality", None)
    partial = out.with_suffix(".partial.tif")
    first = (size - valid) // 2 if valid else 0
    last = first + valid if valid else size
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(partial, "w", **profile) as sink:
        for top in range(0, size, 512):
            rows = np.arange(top, min(top + 512, size))
            band = mirrored(image, top, rows.size, size)
            window = Window(0, top, size, rows.size)
            sink.write(band, window=window)
            if valid:
                mask = np.zeros((rows.size, size), np.uint8)
                inside = (rows >= first) & (rows < last)
                mask[inside, first:last] = 255
                sink.write_mask(mask, window=window)
    partial.rename(out)
    return out


def run_engine(
    scene: Path, model: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """`deeplab segment` in its own process (its peak RSS is its own); returns its report.json.

    The output folder is removed first: a resumed run would compute nothing and time nothing. The report
    gains ``command_seconds``: the command's wall time, imports and Ray's start included.
    """
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline.cli", "segment", str(scene), "--model", str(model)]
    started = time.perf_counter()
    subprocess.run([*command, "--out", str(out), *extra], cwd=ROOT, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - started
    report: dict[str, Any] = json.loads((out / scene.stem / "report.json").read_text())
    return report | {"command_seconds": round(wall, 2)}


def on_running_cluster(
    cluster: LocalRayCluster, scene: Path, model: Path, out: Path, options: list[str]
) -> dict[str, Any]:
    """Two runs joining a running cluster with ``--keep-warm-s``: the first starts the actors, the second
    finds them warm (the nightly case: Ray and the loaded model outlive each job)."""
    runs = {}
    for name in ("first", "warm"):
        extra = ["--no-crf", *options, "--ray-address", cluster.address, "--keep-warm-s", "600"]
        report = run_engine(scene, model, out, *extra, env=cluster.client_env())
        runs[name] = {
            "seconds": report["seconds"],
            "command_seconds": report["command_seconds"],
            "megapixels_per_second": report["megapixels_per_second"],
            "actors_started": report["cluster"]["actors_started"],
            "actors_reused": report["cluster"]["actors_reused"],
        }
    return runs


def model_only_seconds(
    staged_folder: Path,
    model: Path,
    tile: int,
    halo: int,
    cores_per_window: int,
    threads: int,
    runtime: str | None = None,
) -> float:
    """Forward passes alone over the windows the engine ran (read beforehand, not timed), on ``runtime``
    (None: the engine's default for the model on this CPU)."""
    from models.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    loaded = load_checkpoint(model)
    worker = ModelWorker(str(model), device="cpu", threads=threads, amp=False, loaded=loaded, runtime=runtime)
    image = StagedStores.open_image(staged_folder)
    valid = StagedStores.open_valid(staged_folder)
    height, width = image.shape[1:]
    todo, _ = cores_to_compute(plan_tiles(height, width, tile, halo, cores_per_window), valid)
    seconds = 0.0
    for group in window_batches(todo, 4):
        windows = read_windows(image, group)
        started = time.perf_counter()
        worker.predict(windows, (1.0,), "max", False)
        seconds += time.perf_counter() - started
    return seconds


def run_monai(
    scene: Path, model: Path, out: Path, tile: int, halo: int, threads: int, prepared: bool, batch_size: int
) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.monai_baseline", str(scene), "--model", str(model)]
    args = ["--tile", str(tile), "--halo", str(halo), "--threads", str(threads), "--out", str(out)]
    args += ["--batch-size", str(batch_size)] + (["--prepared"] if prepared else [])
    started = time.perf_counter()
    done = subprocess.run([*command, *args], cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"command_seconds": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2048, 16384], help="scene sizes, small first"
    )
    parser.add_argument(
        "--large-valid", type=int, help="valid centred square of the largest scene (default: all of it)"
    )
    parser.add_argument("--halo", type=int, help="override the engine's default halo")
    parser.add_argument("--cores-per-window", type=int, help="override the engine's default block of cores")
    parser.add_argument("--skip-crf", action="store_true")
    parser.add_argument("--name", default="engine", help="report name under bench/reports/")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--work", type=Path, default=Path("/tmp/deeplab-bench"))
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument(
        "--monai",
        nargs="+",
        choices=["loaded", "prepared"],
        default=["loaded", "prepared"],
        help="MONAI's runs: the model as loaded, the engine's prepared model (a 16k² run takes ~10 min each)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="also run each scene twice on a running local cluster with --keep-warm-s (the second: warm)",
    )
    parser.add_argument(
        "--model-only-runs", type=int, default=2, help="model-only passes per scene; the fastest counts"
    )
    parser.add_argument(
        "--runtime", choices=RUNTIMES, help="the engine's and the model-only runs' (default: the engine's)"
    )
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    args.work.mkdir(parents=True, exist_ok=True)
    # One ONNX export for every run (as DEEPLAB_ONNX_CACHE gives a nightly): made here, timed apart, so
    # that each engine run's figures are its steady state, not a fresh output folder's first export.
    os.environ[CACHE_ENV] = str(args.work / "onnx")
    clock = time.perf_counter()
    primed = ModelWorker(
        str(args.model), device="cpu", threads=threads, amp=False, runtime=args.runtime
    ).runtime_name()
    results: dict[str, Any] = {
        "machine": {"cpus": threads, "platform": platform.platform(), "torch": torch.__version__},
        "model": args.model.name,
        "runtime": primed,
        "model_load_and_export_seconds": round(time.perf_counter() - clock, 1),
        "source": str(SOURCE.name),
        "runs": {},
    }
    cluster = None
    if args.warm:  # one cluster for every scene, as a workstation or cluster that keeps Ray running
        cluster = LocalRayCluster(args.work / "rc", workers=[], head_cpus=threads).start()
    try:
        for size in args.sizes:
            run_size(args, size, threads, results, cluster)
    finally:
        if cluster is not None:
            cluster.stop()
    write_text_atomically(REPORTS / f"{args.name}.md", render(results))


def run_size(
    args: argparse.Namespace,
    size: int,
    threads: int,
    results: dict[str, Any],
    cluster: LocalRayCluster | None,
) -> None:
    valid = args.large_valid if len(args.sizes) > 1 and size == args.sizes[-1] else None
    name = f"mosaic-{size}" + (f"-valid{valid}" if valid else "")
    scene = make_mosaic(SOURCE, args.work / f"{name}.tif", size, valid)
    out = args.work / f"out-{size}"
    options = ["--tile", str(args.tile)] + (["--halo", str(args.halo)] if args.halo is not None else [])
    if args.cores_per_window is not None:
        options += ["--cores-per-window", str(args.cores_per_window)]
    if args.runtime is not None:
        options += ["--runtime", args.runtime]
    report = run_engine(scene, args.model, out, "--no-crf", *options)
    staged = out / ".work" / scene.stem
    time.sleep(10)  # the engine's local Ray cluster winds down for a few seconds after it exits
    warm = None
    if cluster is not None:
        warm = on_running_cluster(cluster, scene, args.model, args.work / f"out-{size}-warm", options)
    block = report["cores_per_window"]
    forward = min(
        model_only_seconds(staged, args.model, args.tile, report["halo"], block, threads, args.runtime)
        for _ in range(args.model_only_runs)
    )
    run = {
        "megapixels": size * size / 1e6,
        "valid_megapixels": (valid or size) ** 2 / 1e6,
        "tiles": report["tiles"],
        "halo": report["halo"],
        "cores_per_window": block,
        "windows": report["tiles"]["windows"],
        "runtime": report.get("runtime"),
        "no_crf": {
            "seconds": report["seconds"],
            "megapixels_per_second": report["megapixels_per_second"],
            "peak_rss_mb": report["peak_rss_mb"],
            "command_seconds": report["command_seconds"],
        },
        "model_only_seconds": round(forward, 2),
        "efficiency_vs_compute_stage": round(forward / report["seconds"]["compute"], 3),
        "efficiency_vs_total": round(forward / report["seconds"]["total"], 3),
    }
    if warm is not None:
        for figures in warm.values():
            figures["efficiency_vs_compute_stage"] = round(forward / figures["seconds"]["compute"], 3)
            figures["efficiency_vs_total"] = round(forward / figures["seconds"]["total"], 3)
            figures["efficiency_vs_command"] = round(forward / figures["command_seconds"], 3)
        run["running_cluster"] = warm
    if size == args.sizes[0] and not args.skip_crf:
        crf = run_engine(scene, args.model, args.work / f"out-{size}-crf", *options)
        run["crf"] = {
            "seconds": crf["seconds"],
            "megapixels_per_second": crf["megapixels_per_second"],
            "peak_rss_mb": crf["peak_rss_mb"],
        }
    if not args.skip_monai and not valid:  # MONAI has no nodata skipping: full scenes only
        monai_out = args.work / f"monai-{size}.tif"
        # the model as a MONAI user loads it, and the engine's prepared one (folded, channels last)
        modes = (("monai", False, "loaded"), ("monai_prepared", True, "prepared"))
        for key, prepared in ((key, prepared) for key, prepared, mode in modes if mode in args.monai):
            # MONAI gets the engine's window and overlap: a block's cores + the halo each side
            # (and windows per batch: the engine batches 4 cores)
            windows_per_batch = max(1, 4 // block**2)
            run[key] = run_monai(
                scene,
                args.model,
                monai_out,
                args.tile * block,
                report["halo"],
                threads,
                prepared,
                windows_per_batch,
            )
    results["runs"][str(size)] = run
    REPORTS.mkdir(parents=True, exist_ok=True)
    write_text_atomically(REPORTS / f"{args.name}.json", json.dumps(results, indent=2))
    print(json.dumps(run, indent=2), flush=True)


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Engine benchmark",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}; model "
        f"{results['model']} on the {results.get('runtime', 'eager')} runtime (export and load "
        f"{results.get('model_load_and_export_seconds', '-')} s, once, before the runs); scenes are "
        f"mosaics of {results['source']}. MONAI runs the torch module (as loaded; prepared: the engine's "
        "eager module).",
        "",
        "| scene | halo | cores per window, windows | engine MP/s (no CRF) | MP/s with CRF | "
        "efficiency (segment stage / total) | "
        "peak RSS driver / model actor MB | MONAI MP/s (model as loaded / prepared) | "
        "MONAI peak RSS MB (as loaded / prepared) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, run in results["runs"].items():
        rss = run["no_crf"]["peak_rss_mb"]
        monai = run.get("monai", {})
        prepared = run.get("monai_prepared", {})
        crf = run.get("crf", {})
        block = run.get("cores_per_window", 1)
        lines.append(
            f"| {size}² | {run['halo']} | {block}x{block}, {run.get('windows', '-')} | "
            f"{run['no_crf']['megapixels_per_second']:.3f} | "
            f"{crf.get('megapixels_per_second', '-')} | {run['efficiency_vs_compute_stage']} / "
            f"{run['efficiency_vs_total']} | {rss['driver']} / {_join(rss.get('model_actors', []))} | "
            f"{_mps(monai)} / {_mps(prepared)} | {_rss(monai)} / {_rss(prepared)} |"
        )
    lines += [
        "",
        "Engine MP/s: the scene's report (preflight to publish); MONAI MP/s: reading, inference and writing, "
        "after its model is loaded. Whole commands, wall time in seconds (imports, Ray's start and model "
        "loads included):",
        "",
        "| scene | engine (no CRF) | MONAI, model as loaded | MONAI, prepared model |",
        "|---|---|---|---|",
    ]
    for size, run in results["runs"].items():
        walls = [run.get(key, {}).get("command_seconds", "-") for key in ("monai", "monai_prepared")]
        lines.append(f"| {size}² | {run['no_crf'].get('command_seconds', '-')} | {walls[0]} | {walls[1]} |")
    runs_of = results["runs"].items()
    running = {size: run["running_cluster"] for size, run in runs_of if "running_cluster" in run}
    if running:
        lines += [
            "",
            "On a running local cluster (`--ray-address`, `--keep-warm-s 600`): the first run starts the "
            "actors, the second finds them warm. Efficiency: model-only forward over the segment stage / "
            "the report's total / the whole command:",
            "",
            "| scene | run | actors started / reused | segment stage s | report total s | whole command s | "
            "efficiency (segment / total / command) |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, runs in running.items():
            for name, figures in runs.items():
                lines.append(
                    f"| {size}² | {name} | {figures['actors_started']} / {figures['actors_reused']} | "
                    f"{figures['seconds']['compute']} | {figures['seconds']['total']} | "
                    f"{figures['command_seconds']} | {figures['efficiency_vs_compute_stage']} / "
                    f"{figures['efficiency_vs_total']} / {figures['efficiency_vs_command']} |"
                )
    return "\n".join(lines) + "\n"


def _mps(run: dict[str, Any]) -> str:
    return f"{run['megapixels_per_second']:.3f}" if run else "-"


def _rss(run: dict[str, Any]) -> str:
    return f"{run['peak_rss_mb']:.0f}" if run else "-"


def _join(values: list[float]) -> str:
    return ", ".join(str(v) for v in values)


if __name__ == "__main__":
    main()
