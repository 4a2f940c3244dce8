"""The model path on CPU: the engine's eager forward against torch.compile and ONNX Runtime, same windows.

Each runtime runs the same model (BatchNorm folded, channels last: ``models.optimize.for_inference``, the
engine's eager path) on the same engine windows of the real Kampala scene, with the same threads, in one
run; labels are compared with eager's. Run: python -m bench.runtimes (bench/reports/runtimes.{json,md}).
Its adopted rows are ``models.runtime.ONNX_ON_CPU``, the engine's CPU default (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rasterio
import torch

from bench.reporting import machine, write_report
from models.checkpoint import load_checkpoint
from models.inference import SIZE_MULTIPLE, normalise
from models.optimize import for_inference
from models.runtime import ADOPT_AT, OnnxRuntime, exported, onnxruntime_installed

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
SCENE = DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"


def engine_batch(side: int, count: int, bands: Any) -> torch.Tensor:
    """``count`` windows of ``side`` px (a multiple of 32, as the engine pads them) from the real scene."""
    with rasterio.open(SCENE) as source:
        image = source.read((1, 2, 3))
    starts = [
        (r, c)
        for r in range(0, image.shape[1] - side + 1, side)
        for c in range(0, image.shape[2] - side + 1, side)
    ]
    windows = [image[:, r : r + side, c : c + side] for r, c in starts[:count]]
    return torch.stack([normalise(w, bands) for w in windows])


Run = Callable[[torch.Tensor], torch.Tensor]


def measure(model_path: Path, side: int, count: int, threads: int, repeats: int) -> dict[str, Any]:
    """Each runtime's seconds per batch, in ``repeats`` rounds that time every runtime once, in turn: a
    change in the machine's load then falls on all of them alike. The speed-ups are ratios of medians."""
    torch.set_num_threads(threads)
    loaded = load_checkpoint(model_path)
    model = for_inference(loaded.model).eval()
    batch = engine_batch(side, count, loaded.metadata.bands)
    assert side % SIZE_MULTIPLE == 0
    megapixels = count * side * side / 1e6
    with tempfile.TemporaryDirectory(prefix="deeplab-onnx-") as cache:
        runs, rows = _runtimes(model, loaded.sha256, batch, threads, Path(cache))
        with torch.inference_mode():
            outputs = {name: run(batch) for name, run in runs.items()}  # warm-up (compile: compiled before)
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(repeats):
                for name, run in runs.items():
                    clock = time.perf_counter()
                    run(batch)
                    seconds[name].append(time.perf_counter() - clock)
    labels = outputs["eager"].argmax(1)
    eager_median = statistics.median(seconds["eager"])
    for name, times in seconds.items():
        median = statistics.median(times)
        rows[name] |= {
            "median_s": round(median, 3),
            "best_s": round(min(times), 3),
            "mp_per_s": round(megapixels / median, 3),
            "speed_vs_eager": round(eager_median / median, 2),
        }
        if name != "eager":
            rows[name]["agreement"] = _agree(outputs[name], labels)
            rows[name]["adopt"] = (
                rows[name]["speed_vs_eager"] >= ADOPT_AT and rows[name]["agreement"] >= 0.999
            )
    return {
        "model": model_path.name,
        "architecture": loaded.metadata.architecture,
        "windows": count,
        "side": side,
        "threads": threads,
        "repeats": repeats,
        "runtimes": rows,
    }


def _runtimes(
    model: torch.nn.Module, sha256: str, batch: torch.Tensor, threads: int, cache: Path
) -> tuple[dict[str, Run], dict[str, dict[str, Any]]]:
    """The runtimes to time, ready to run (compiled, exported: those costs measured here, apart), and their
    report rows so far; a runtime that cannot run has a row saying why."""
    runs: dict[str, Run] = {"eager": model}
    rows: dict[str, dict[str, Any]] = {"eager": {}}
    compiled = torch.compile(model, dynamic=False)
    clock = time.perf_counter()
    try:
        with torch.inference_mode():
            compiled(batch)  # compiles for this shape
        runs["torch.compile"] = compiled
        rows["torch.compile"] = {"compile_s": round(time.perf_counter() - clock, 1)}
    except Exception as exc:
        rows["torch.compile"] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if not onnxruntime_installed():
        rows["onnxruntime"] = {"skipped": "onnxruntime or onnx is not installed"}
    else:
        clock = time.perf_counter()
        path = exported(model, sha256, cache, batch.shape[1])  # the engine's own export and session
        runs["onnxruntime"] = OnnxRuntime(path, threads)
        rows["onnxruntime"] = {"export_s": round(time.perf_counter() - clock, 1)}
    return runs, rows


def _agree(out: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((out.argmax(1) == labels).float().mean()), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[
            ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors",
            ROOT / "models" / "zoo" / "buildings-kampala.safetensors",
            ROOT / "models" / "zoo" / "buildings-kampala-v2.safetensors",
        ],
    )
    parser.add_argument("--side", type=int, default=640, help="window side: the 512 px core and its halo")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8, help="rounds, each timing every runtime once")
    args = parser.parse_args()
    results = [measure(m, args.side, args.windows, args.threads, args.repeats) for m in args.models]
    report: dict[str, Any] = {"machine": machine(), "results": results}
    lines = [
        "# The model path on CPU: runtimes against eager",
        "",
        f"{report['machine']['cpus']} CPUs, {args.threads} threads, {args.windows} windows of {args.side}² "
        f"px of the Kampala scene; {args.repeats} rounds, each timing every runtime once in turn; median "
        "seconds per batch (best in brackets); x eager: the ratio of medians; agreement: labels equal to "
        "eager's.",
        "",
        "| model | runtime | s | MP/s | x eager | agreement | adopt (>= 1.3x, >= 99.9%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for name, row in result["runtimes"].items():
            if "mp_per_s" in row:
                lines.append(
                    f"| {result['model']} | {name} | {row['median_s']} ({row['best_s']}) | "
                    f"{row['mp_per_s']} | {row.get('speed_vs_eager', 1.0)} | {row.get('agreement', '-')} | "
                    f"{row.get('adopt', '-')} |"
                )
            else:
                lines.append(
                    f"| {result['model']} | {name} | {row.get('failed') or row.get('skipped')} | | | | |"
                )
    write_report("runtimes", report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
