"""Training on Ray Train: 1 worker against 2 on the same data and settings (each worker one torch thread),
on a local Ray cluster: seconds per epoch and crops per second, as a ratio measured in the same run.

    python -m bench.train_workers          # bench/reports/train-workers.{json,md}; a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.reporting import machine, write_report
from models.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parent.parent


def run(workers: int, data: Path, folder: Path, epochs: int, arch: str) -> dict[str, Any]:
    out = folder / f"workers-{workers}.safetensors"
    command = [str(Path(sys.executable).with_name("deeplab")), "train", "--csv", str(data / "chips.csv")]
    command += [
        "--classes",
        "background,building",
        "--arch",
        arch,
        "--pretrained",
        "none",
        "--epochs",
        str(epochs),
    ]
    command += [
        "--batch-size",
        "8",
        "--crop-size",
        "256",
        "--threads",
        "1",
        "--seed",
        "0",
        "--workers",
        str(workers),
    ]
    subprocess.run([*command, "--out", str(out)], check=True)
    history = read_metadata(out).metrics["history"]
    seconds = [record["seconds"] for record in history[1:]]  # the first epoch also warms the workers up
    return {"workers": workers, "epoch_seconds": seconds, "mean_epoch_s": sum(seconds) / len(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kampala-buildings")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="deeplabv3plus_efficientnet_lite0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="train-workers-") as folder:
        results = [run(n, args.data, Path(folder), args.epochs, args.arch) for n in (1, 2)]
    crops_per_epoch = 126  # one 256 px crop per 256 px chip: 126 chips (no held-out split here)
    for result in results:
        result["crops_per_s"] = round(crops_per_epoch / result["mean_epoch_s"], 2)
    speedup = results[0]["mean_epoch_s"] / results[1]["mean_epoch_s"]
    report = {
        "machine": machine(),
        "arch": args.arch,
        "epochs": args.epochs,
        "runs": results,
        "speedup": speedup,
    }
    lines = [
        "# Ray Train: 1 worker against 2 (`python -m bench.train_workers`)",
        "",
        f"{args.arch}, the 126 Kampala chips, batch 8 of 256 px crops, {args.epochs} epochs,",
        "one torch thread per worker, a local Ray cluster on this machine",
        f"({machine()['cpus']} CPUs); epochs after the first.",
        "",
        "| workers | seconds per epoch | crops per second |",
        "| --- | --- | --- |",
        *(f"| {r['workers']} | {r['mean_epoch_s']:.1f} | {r['crops_per_s']:.2f} |" for r in results),
        "",
        f"2 workers: {speedup:.2f}x the throughput of 1.",
    ]
    write_report("train-workers", report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
