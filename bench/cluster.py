"""Scaling benchmark: one versus two Ray worker nodes, and the per-tile costs behind a cluster estimate.

    python -m bench.cluster [--scene S --model M --tile 128] [--cost-scene S --cost-model M]

Each run brings up a real multi-node cluster on this machine (pipeline.ray.local_cluster: a head with no CPUs,
N worker nodes of one CPU each, every node pinned to its own physical core as a separate machine would be)
and runs `deeplab segment --ray-address` on it as a client would. Throughput is taken from the ledger's
per-core timestamps between the first and the last core (actor start-up excluded) and end to end.
The same run measures per-tile costs on one core (model forward, dense CRF, the driver's read and write) of
512 px cores of the Kampala aerial scene, from which bench/reports/cluster.md derives a km²/h estimate for a
named GPU cluster.
Results go to bench/reports/cluster.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deeplab_common.atomic import write_text_atomically
from models.checkpoint import load_checkpoint
from pipeline.engine.grid import model_halo, plan_tiles, read_window
from pipeline.engine.ledger import Ledger
from pipeline.engine.stage import stage_scene
from pipeline.engine.workers import CRFWorker, ModelWorker, write_core
from pipeline.io.readers import describe
from pipeline.ray.local_cluster import LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
# Scaling runs: the Landsat scene with its nodata collar (35 cores of 128 px, CRF on: about a minute a node).
SCENE = DATA / "landsat" / "RGB.byte.tif"
MODEL = ROOT / "models" / "zoo" / "landcover-dubai-lite0.safetensors"
# Per-tile costs for the estimate: 512 px cores of the 7.5 cm aerial scene and its model.
COST_SCENE = DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"
COST_MODEL = ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors"
REPORTS = ROOT / "bench" / "reports"

# The paper estimate's cluster, and the one figure this machine cannot measure (no GPU here): the A10G's
# effective rate on this model's forward pass, a conservative 10% of its 125 TFLOP/s dense fp16 peak
# (small depthwise-separable networks are bound by memory traffic, not arithmetic).
CLUSTER = "4 x g5.xlarge (1 NVIDIA A10G, 4 vCPU each) + 4 x c6i.4xlarge (16 vCPU, 8 physical cores each)"
GPUS = 4
CRF_CORES = 4 * 8 + 4 * 3  # physical cores for CRF actors: the CPU nodes', and 3 of each GPU node's 4
GPU_EFFECTIVE_TFLOPS = 12.5
DRIVERS = 1


def run_on_cluster(nodes: int, scene: Path, model: Path, work: Path, tile: int) -> dict[str, Any]:
    """`deeplab segment` on a fresh cluster of ``nodes`` one-core worker nodes; throughput from the ledger."""
    cores = sorted(os.sched_getaffinity(0))
    if nodes > len(cores):
        raise SystemExit(f"{nodes} worker nodes need {nodes} cores; this machine has {len(cores)}")
    out = work / f"out-{nodes}"
    shutil.rmtree(out, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix="dlb-"))
    workers = [{"cpus": 1, "affinity": [cores[i]]} for i in range(nodes)]
    try:
        with LocalRayCluster(root, workers=workers) as cluster:
            command = [sys.executable, "-m", "pipeline.cli", "segment", str(scene), "--model", str(model)]
            command += ["--out", str(out), "--tile", str(tile), "--ray-address", cluster.address]
            subprocess.run(command, cwd=ROOT, env=cluster.client_env(), check=True, capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = json.loads((out / scene.stem / "report.json").read_text())
    stamps = sorted(json.loads(line)["at"] for line in (out / ".work" / scene.stem / "ledger.jsonl").open())
    steady = (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    return {
        "worker_nodes": nodes,
        "cores_computed": report["tiles"]["computed"],
        "compute_seconds": report["seconds"]["compute"],
        "total_seconds": report["seconds"]["total"],
        "cores_per_second_steady": round(steady, 4),
        "cores_per_second_end_to_end": round(report["tiles"]["computed"] / report["seconds"]["compute"], 4),
        "windows_by_node": report["cluster"]["nodes"],
        "pixel_size_m": report["pixel_size_m"],
        "halo": report["halo"],
    }


def per_tile_costs(scene: Path, model: Path, tile: int, work: Path, samples: int = 12) -> dict[str, float]:
    """Seconds per core on one CPU core: model forward (batch 1), dense CRF, driver's read + write.

    The scene is staged by the engine's own staging; full-size windows only (no edge windows)."""
    torch.set_num_threads(1)
    loaded = load_checkpoint(model)
    staged = stage_scene(scene, work / "costs" / ".work", tile)
    image = staged.image()
    height, width = image.shape[1:]
    crf_params = loaded.metadata.crf
    halo = model_halo(loaded.metadata, crf_params.sigma_alpha, tile)
    full = (tile + 2 * halo, tile + 2 * halo)
    tiles = [t for t in plan_tiles(height, width, tile, halo) if t.window[2:] == full][:samples]
    model_worker = ModelWorker(str(model), device="cpu", threads=1, amp=False, loaded=loaded)
    crf_worker = CRFWorker()
    windows = [read_window(image, t) for t in tiles]
    model_worker.predict(windows[:1], (1.0,), "max", True)  # warm-up
    started = time.perf_counter()
    probabilities = [model_worker.predict([w], (1.0,), "max", True)[0] for w in windows]
    forward = (time.perf_counter() - started) / len(windows)
    started = time.perf_counter()
    planes = [
        crf_worker.refine_core(p, w, crf_params, loaded.metadata.input_max, t)
        for p, w, t in zip(probabilities, windows, tiles, strict=True)
    ]
    crf = (time.perf_counter() - started) / len(windows)
    ledger_folder = work / "costs" / "ledger"
    shutil.rmtree(ledger_folder, ignore_errors=True)
    ledger_folder.mkdir(parents=True)
    ledger = Ledger(ledger_folder, "bench", (height, width), tile)
    started = time.perf_counter()
    for t, p in zip(tiles, planes, strict=True):
        read_window(image, t)
        write_core(ledger, t, None, p)
    driver = (time.perf_counter() - started) / len(tiles)
    with torch.no_grad():
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        batch = torch.zeros((1, len(loaded.metadata.bands), *windows[0].shape[1:]))
        with counter:
            loaded.model(batch)
    return {
        "tile_px": tile,
        "window_px": int(windows[0].shape[1]),
        "pixel_size_m": float(describe(scene).pixel_size_m() or 0.0),
        "model_forward_s": round(forward, 4),
        "crf_s": round(crf, 4),
        "driver_read_write_s": round(driver, 4),
        "model_gflops_per_window": round(counter.get_total_flops() / 1e9, 2),
    }


def estimate(costs: dict[str, float], scaling: float) -> dict[str, Any]:
    """Cores per hour of the named cluster: the slowest of GPU inference, CRF CPUs and the driver."""
    gpu_s = costs["model_gflops_per_window"] / (GPU_EFFECTIVE_TFLOPS * 1e3)
    rates = {
        "gpu_inference": GPUS / gpu_s,
        "crf": CRF_CORES / costs["crf_s"] * min(1.0, scaling),
        "driver": DRIVERS / costs["driver_read_write_s"],
    }
    pixel_m = costs["pixel_size_m"]
    core_km2 = (costs["tile_px"] * pixel_m) ** 2 / 1e6
    with_crf = min(rates.values())
    without_crf = min(rates["gpu_inference"], rates["driver"])
    return {
        "cluster": CLUSTER,
        "assumed_gpu_effective_tflops": GPU_EFFECTIVE_TFLOPS,
        "gpu_seconds_per_window": round(gpu_s, 5),
        "cores_per_second": {k: round(v, 1) for k, v in rates.items()},
        "bottleneck_with_crf": min(rates, key=lambda k: rates[k]),
        "km2_per_core": core_km2,
        "pixel_size_m": pixel_m,
        "km2_per_hour_with_crf": round(with_crf * 3600 * core_km2, 1),
        "km2_per_hour_without_crf": round(without_crf * 3600 * core_km2, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", type=Path, default=SCENE)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--cost-scene", type=Path, default=COST_SCENE)
    parser.add_argument("--cost-model", type=Path, default=COST_MODEL)
    parser.add_argument("--work", type=Path, default=Path("/tmp/deeplab-bench-cluster"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [run_on_cluster(n, args.scene, args.model, args.work, args.tile) for n in (1, 2)]
    one, two = runs
    scaling = two["cores_per_second_steady"] / one["cores_per_second_steady"]
    costs = per_tile_costs(args.cost_scene, args.cost_model, 512, args.work)
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "scene": args.scene.name,
        "model": args.model.name,
        "tile": args.tile,
        "runs": runs,
        "two_over_one_steady": round(scaling, 3),
        "two_over_one_end_to_end": round(
            two["cores_per_second_end_to_end"] / one["cores_per_second_end_to_end"], 3
        ),
        "cost_scene": args.cost_scene.name,
        "cost_model": args.cost_model.name,
        "per_tile_costs": costs,
        "estimate": estimate(costs, scaling / 2),
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    write_text_atomically(REPORTS / "cluster.json", json.dumps(results, indent=2))
    write_text_atomically(REPORTS / "cluster.md", render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    one, two = results["runs"]
    est = results["estimate"]
    costs = results["per_tile_costs"]
    lines = [
        "# Cluster benchmark: one versus two worker nodes",
        "",
        f"Machine: {results['machine']['cpus']} CPUs ({results['machine']['platform']}). Scene "
        f"{results['scene']}, model {results['model']}, CRF on, {results['tile']} px cores. Each worker "
        "node is a `ray start` with 1 CPU pinned to its own core; the head has none; the driver joins as a "
        "client.",
        "",
        "| worker nodes | cores | cores/s steady | cores/s end to end | segment s | windows by node |",
        "|---|---|---|---|---|---|",
    ]
    for run in (one, two):
        lines.append(
            f"| {run['worker_nodes']} | {run['cores_computed']} | {run['cores_per_second_steady']} | "
            f"{run['cores_per_second_end_to_end']} | {run['compute_seconds']} | "
            f"{json.dumps(run['windows_by_node'])} |"
        )
    lines += [
        "",
        f"Two nodes over one: **{results['two_over_one_steady']}x** steady, "
        f"{results['two_over_one_end_to_end']}x end to end (actor start-up included).",
        "",
        f"Per-tile costs on one core, {results['cost_scene']} with {results['cost_model']} "
        f"({costs['tile_px']} px cores, {costs['window_px']} px windows): model forward "
        f"{costs['model_forward_s']} s ({costs['model_gflops_per_window']} GFLOP), dense CRF "
        f"{costs['crf_s']} s, driver read + ledger write {costs['driver_read_write_s']} s.",
        "",
        f"## Estimate: {est['cluster']}",
        "",
        f"{costs['tile_px']} px cores at {est['pixel_size_m']:.3g} m/px "
        f"({est['km2_per_core']:.5f} km² each). GPU inference assumed at "
        f"{est['assumed_gpu_effective_tflops']} TFLOP/s effective per A10G "
        f"({est['gpu_seconds_per_window']} s per window; not measured: no GPU here); the CRF and driver "
        "costs are this machine's, per core, scaled by the measured two-node efficiency.",
        "",
        "| stage | cores/s the cluster sustains |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in est["cores_per_second"].items()],
        "",
        f"Bottleneck with CRF: {est['bottleneck_with_crf']}. **{est['km2_per_hour_with_crf']} km²/h with the "
        f"CRF, {est['km2_per_hour_without_crf']} km²/h without** (one driver per scene; several scenes run "
        "as several drivers).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
