"""The dense CRF's backends on 1-MP windows: pydensecrf2 (one core) against torch on CPU (1 and 2 threads).

Real windows and real model probabilities: the Kampala scene with the zoo building model (2 classes) and a
held-out Dubai tile-7 image with the zoo land-cover model (6 classes), 10 mean-field iterations, each
checkpoint's tuned CRF parameters. Each measurement runs in a fresh process, so its peak memory is its own.
Reports MP/s, peak RSS above the process's baseline, and label agreement with pydensecrf2.

Run: python -m bench.crf (writes bench/reports/crf.json and crf.md; ~5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from bench.reporting import machine, write_report
from models.data import read_image
from models.metadata import CRFParams
from pipeline.engine.workers import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
ZOO = ROOT / "models" / "zoo"
SIDE = 1024  # 1 MP windows


def windows() -> dict[str, tuple[np.ndarray, Path]]:
    with rasterio.open(DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif") as source:
        kampala = source.read((1, 2, 3), window=((1024, 1024 + SIDE), (1024, 1024 + SIDE)))
    dubai = read_image(DATA / "dubai-landcover" / "images" / "tile7_image_part_003.jpg")[:, :SIDE, :SIDE]
    return {
        "kampala-2-classes": (kampala, ZOO / "buildings-kampala.safetensors"),
        "dubai-6-classes": (dubai, ZOO / "landcover-dubai.safetensors"),
    }


def probabilities_of(image: np.ndarray, model: Path) -> tuple[np.ndarray, CRFParams]:
    from pipeline.engine.workers import ModelWorker

    worker = ModelWorker(str(model), device="cpu", threads=None, amp=False)
    probabilities = worker.predict([image], (1.0,), "max", as_probabilities=True)[0].astype(np.float32)
    return probabilities, worker.loaded.metadata.crf


def _measure(job: dict[str, Any], answer: Any) -> None:
    """In a fresh process: one backend on one window, timed (the first call warms up on a small cut)."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline.crf import backend

    data = np.load(job["inputs"])
    image, probabilities = data["image"], data["probabilities"]
    params = CRFParams.model_validate(job["params"])
    crf = backend(job["backend"])
    crf.refine(probabilities[:, :64, :64], image[:, :64, :64], params)  # imports, allocator, first-call costs
    baseline = peak_rss_mb()
    started = time.perf_counter()
    labels = crf.refine_labels(probabilities, image, params)
    seconds = time.perf_counter() - started
    np.save(job["labels"], labels)
    answer.send({"seconds": seconds, "peak_rss_above_baseline_mb": peak_rss_mb() - baseline})


def run(job: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=_measure, args=(job, theirs))
    process.start()
    result: dict[str, Any] = mine.recv()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "crf")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is reported")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = [("pydensecrf", 1), ("torch", 1), ("torch", 2)]
    rows: list[dict[str, Any]] = []
    for name, (image, model) in windows().items():
        probabilities, params = probabilities_of(image, model)
        inputs = args.work / f"{name}.npz"
        np.savez(inputs, image=image, probabilities=probabilities)
        megapixels = image.shape[1] * image.shape[2] / 1e6
        reference: np.ndarray | None = None
        for backend_name, threads in settings:
            labels_path = args.work / f"{name}-{backend_name}-{threads}.npy"
            job = {
                "inputs": str(inputs),
                "labels": str(labels_path),
                "backend": backend_name,
                "threads": threads,
                "params": params.model_dump(),
            }
            runs = [run(job) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            labels = np.load(labels_path)
            if reference is None:
                reference = labels
            rows.append(
                {
                    "window": name,
                    "classes": int(probabilities.shape[0]),
                    "megapixels": round(megapixels, 3),
                    "backend": backend_name,
                    "threads": threads,
                    "seconds": round(best["seconds"], 3),
                    "mp_per_s": round(megapixels / best["seconds"], 3),
                    "peak_rss_above_baseline_mb": round(
                        max(r["peak_rss_above_baseline_mb"] for r in runs), 1
                    ),
                    "agreement_with_pydensecrf": round(float((labels == reference).mean()), 5),
                    "changed_by_crf": round(float((reference != probabilities.argmax(0)).mean()), 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["window"] == row["window"] and r["backend"] == "pydensecrf")
        row["speed_vs_pydensecrf"] = round(row["mp_per_s"] / base["mp_per_s"], 2)
    result: dict[str, Any] = {"machine": machine(), "iterations": 10, "rows": rows}
    lines = [
        "# Dense CRF backends, 1-MP windows, 10 iterations",
        "",
        f"{result['machine']['cpus']} CPUs; each setting in a fresh process, fastest of {args.repeats}. "
        "Agreement: share of pixels whose label equals pydensecrf2's.",
        "",
        "| window | classes | backend | threads | s | MP/s | x pydensecrf | peak MB | agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['window']} | {r['classes']} | {r['backend']} | {r['threads']} | {r['seconds']} | "
        f"{r['mp_per_s']} | {r['speed_vs_pydensecrf']} | {r['peak_rss_above_baseline_mb']} | "
        f"{r['agreement_with_pydensecrf']} |"
        for r in rows
    ]
    write_report("crf", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
