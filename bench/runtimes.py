"""The model path on CPU: the engine's eager forward against torch.compile and ONNX Runtime, same windows.

Each runtime runs the same model (BatchNorm folded, channels last: ``models.optimize.for_inference``, the
engine's eager path) on the same engine windows of the real Kampala scene, with the same threads, in one
run; labels are compared with eager's. Run: python -m bench.runtimes (bench/reports/runtimes.{json,md}).
ONNX Runtime needs the `bench` extra (onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
SCENE = DATA / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif"
ADOPT_AT = 1.3  # the bar: adopt a runtime at least this much faster with labels equal on >= 99.9%


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


def timed(
    run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, repeats: int
) -> tuple[float, torch.Tensor]:
    out = run(batch)  # warm-up (and, for compile, the compilation, timed apart)
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        out = run(batch)
        best = min(best, time.perf_counter() - clock)
    return best, out


def measure(model_path: Path, side: int, count: int, threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    loaded = load_checkpoint(model_path)
    model = for_inference(loaded.model).eval()
    batch = engine_batch(side, count, loaded.metadata.bands)
    assert side % SIZE_MULTIPLE == 0
    megapixels = count * side * side / 1e6
    rows: dict[str, Any] = {}

    @torch.inference_mode()
    def eager(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    seconds, reference = timed(eager, batch, repeats)
    labels = reference.argmax(1)
    rows["eager"] = {"seconds": round(seconds, 3), "mp_per_s": round(megapixels / seconds, 3)}

    compiled = torch.compile(model, dynamic=False)

    @torch.inference_mode()
    def with_compile(x: torch.Tensor) -> torch.Tensor:
        return compiled(x)

    clock = time.perf_counter()
    try:
        with_compile(batch)
        compile_s = time.perf_counter() - clock
        seconds, out = timed(with_compile, batch, repeats)
        rows["torch.compile"] = {
            "seconds": round(seconds, 3),
            "mp_per_s": round(megapixels / seconds, 3),
            "compile_s": round(compile_s, 1),
            "agreement": _agree(out, labels),
        }
    except Exception as exc:
        rows["torch.compile"] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if importlib.util.find_spec("onnxruntime") is None:
        rows["onnxruntime"] = {"skipped": "onnxruntime is not installed (pip install -e '.[bench]')"}
    else:
        rows["onnxruntime"] = _onnxruntime(model, batch, labels, threads, repeats, megapixels)
    for row in rows.values():
        if "mp_per_s" in row:
            row["speed_vs_eager"] = round(row["mp_per_s"] / rows["eager"]["mp_per_s"], 2)
            row["adopt"] = row["speed_vs_eager"] >= ADOPT_AT and row.get("agreement", 1.0) >= 0.999
    return {"model": model_path.name, "windows": count, "side": side, "threads": threads, "runtimes": rows}


def _agree(out: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((out.argmax(1) == labels).float().mean()), 5)


def _onnxruntime(
    model: torch.nn.Module,
    batch: torch.Tensor,
    labels: torch.Tensor,
    threads: int,
    repeats: int,
    megapixels: float,
) -> dict[str, Any]:
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="deeplab-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        clock = time.perf_counter()
        torch.onnx.export(
            model,
            (batch[:1],),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
            dynamo=False,
        )
        export_s = time.perf_counter() - clock
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    seconds, out = timed(run, batch, repeats)
    return {
        "seconds": round(seconds, 3),
        "mp_per_s": round(megapixels / seconds, 3),
        "export_s": round(export_s, 1),
        "agreement": _agree(out, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[
            ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors",
            ROOT / "models" / "zoo" / "buildings-kampala.safetensors",
        ],
    )
    parser.add_argument("--side", type=int, default=640, help="window side: the 512 px core and its halo")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results = [measure(m, args.side, args.windows, args.threads, args.repeats) for m in args.models]
    report: dict[str, Any] = {"machine": machine(), "results": results}
    lines = [
        "# The model path on CPU: runtimes against eager",
        "",
        f"{report['machine']['cpus']} CPUs, {args.threads} threads, {args.windows} windows of {args.side}² "
        "px of the Kampala scene; fastest of the repeats; agreement: labels equal to eager's.",
        "",
        "| model | runtime | s | MP/s | x eager | agreement | adopt (>= 1.3x, >= 99.9%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for name, row in result["runtimes"].items():
            if "mp_per_s" in row:
                lines.append(
                    f"| {result['model']} | {name} | {row['seconds']} | {row['mp_per_s']} | "
                    f"{row.get('speed_vs_eager', 1.0)} | {row.get('agreement', '-')} | "
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
