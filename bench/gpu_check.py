"""The prepared GPU check: what the engine's GPU path does on one GPU, measured in one call (< 5 minutes).

    python -m bench.gpu_check prepare    # here: .gpu/ holds the inputs and wheels the device call carries
    bash bench/gpu_check.sh              # there: writes $OUT/gpu_check.json (else bench/reports/)
    python -m bench.gpu_check restore    # here: the zoo checkpoints ``prepare`` set aside go back
    python -m bench.gpu_check run --device cpu --smoke   # the same code on small sizes, on any machine

The device tool sends the working tree and carried paths, 64 MiB in all, to an image without most of the
project's packages; ``../shared/data`` does not travel. So ``prepare`` cuts the real inputs into
``.gpu/inputs`` (with pydensecrf2's labels for them, computed here: pydensecrf2 has no wheel for the
device's Python), sets the zoo checkpoints the check does not read aside, and fetches the few wheels the
GPU path imports (zarr, pydantic, ...). Ray's wheel alone is over the limit: there, the Ray section says
so and the others run.

Sections (each written to the report as it finishes; one that cannot run says why and the rest go on):
- ``crf``: the torch CRF on the device on real 1-MP windows (2 and 6 classes; the zoo models' probabilities)
  against pydensecrf2 (one CPU core, timed here): seconds, MP/s, label agreement, GPU memory; and a batch
  of four windows in one lattice;
- ``amp``: the model's forward pass with mixed precision on and off: MP/s and label agreement;
- ``model_actor``: the model actor's whole work (``ModelWorker.segment_cores``: windows in, finished cores
  out) over a 16384² mosaic of the real Kampala scene held in memory, without the CRF and with it on the
  GPU (``--crf-device gpu``); then two such workers sharing the GPU (what ``--gpus-per-model-actor 0.5``
  places), each on half the windows. Reading from zarr, the ledger and publishing are not in it;
- ``ray``: where Ray and the I/O packages are installed, ``deeplab segment`` end to end on the mosaic with a
  whole and half a GPU per model actor.
Against the target of 20 MP/s with the CRF on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.mosaic import mirrored
from deeplab_common.atomic import write_text_atomically

ROOT = Path(__file__).resolve().parents[1]
STAGING = ROOT / ".gpu"  # ignored (.git/info/exclude); carried by the device call
INPUTS = STAGING / "inputs"
WHEELS = STAGING / "wheels"
ASIDE = STAGING / "aside"
MODEL = ROOT / "models" / "zoo" / "buildings-kampala-lite0.safetensors"
TARGET_MP_PER_S = 20.0  # the target on one H100/H200-class GPU, end to end with the CRF
# what the GPU path imports beyond the device image's packages (KINDS.md), fetched at this venv's versions
WHEEL_PACKAGES = (
    "zarr",
    "numcodecs",
    "donfig",
    "google-crc32c",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
)


# --- here: prepare and restore -------------------------------------------------------------------------


def prepare(inputs_only: bool = False) -> None:
    """The inputs, then (unless ``inputs_only``: a smoke run here) the wheels and the tree under the device
    tool's limit."""
    prepare_inputs()
    if inputs_only:
        return
    ASIDE.mkdir(exist_ok=True)
    for checkpoint in (ROOT / "models" / "zoo").glob("*.safetensors"):
        if checkpoint != MODEL:
            shutil.move(checkpoint, ASIDE / checkpoint.name)
    _wheels()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    size = sum((ROOT / p).stat().st_size for p in tracked.decode().split("\0") if p and (ROOT / p).exists())
    carried = sum(f.stat().st_size for f in STAGING.rglob("*") if f.is_file() and ASIDE not in f.parents)
    print(
        f"tracked files present {size / 2**20:.1f} MiB + .gpu/inputs and wheels {carried / 2**20:.1f} MiB "
        f"(the limit: 64 MiB). Call: run(command='bash bench/gpu_check.sh', carry=['.gpu/inputs', "
        "'.gpu/wheels']); then python -m bench.gpu_check restore"
    )


def prepare_inputs() -> None:
    """Real windows with their probabilities and pydensecrf2's labels, and the Kampala scene as PNG."""
    from PIL import Image

    from bench.crf import probabilities_of, windows
    from pipeline.crf import backend

    INPUTS.mkdir(parents=True, exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    if "/.gpu/" not in (exclude.read_text().split() if exclude.exists() else []):
        with exclude.open("a") as handle:
            handle.write("/.gpu/\n")
    arrays: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for name, (image, model) in windows().items():
        probabilities, params = probabilities_of(image, model)
        # float16, as the engine ships them to the CRF: half the bytes to carry
        probabilities = probabilities.astype(np.float16).astype(np.float32)
        clock = time.perf_counter()
        labels = backend("pydensecrf").refine_labels(probabilities, image, params)
        meta[name] = {
            "params": params.model_dump(),
            "pydensecrf_1_core_s": round(time.perf_counter() - clock, 3),
        }
        arrays |= {
            f"{name}/image": image,
            f"{name}/probabilities": probabilities.astype(np.float16),
            f"{name}/labels": labels,
        }
    np.savez_compressed(INPUTS / "crf_windows.npz", **arrays)
    (INPUTS / "crf_windows.json").write_text(json.dumps(meta, indent=2))
    Image.fromarray(np.moveaxis(_scene_here(), 0, -1)).save(INPUTS / "scene.png", optimize=True)


def _scene_here() -> np.ndarray:
    import rasterio

    data = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
    with rasterio.open(data / "kampala-buildings" / "scene" / "kampala_z21_rgb.tif") as source:
        return source.read((1, 2, 3))


def _wheels() -> None:
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ]
    for package in WHEEL_PACKAGES:
        shown = subprocess.run([sys.executable, "-m", "pip", "show", package], capture_output=True, text=True)
        version = next(
            (line.split()[1] for line in shown.stdout.splitlines() if line.startswith("Version:")), None
        )
        if version is None:
            continue
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            "-d",
            str(WHEELS),
            f"{package}=={version}",
        ]
        for name in platforms:
            command += ["--platform", name]
        subprocess.run(command, check=True)


def restore() -> None:
    for checkpoint in ASIDE.glob("*.safetensors"):
        shutil.move(checkpoint, ROOT / "models" / "zoo" / checkpoint.name)
    print("the zoo checkpoints are back in models/zoo")


# --- there: the check -------------------------------------------------------------------------------------


class Report:
    """The JSON report, rewritten after every section: a run cut short still leaves what it measured."""

    def __init__(self, path: Path, started: float, budget_s: float) -> None:
        self.path = path
        self.started = started
        self.budget_s = budget_s
        self.data: dict[str, Any] = {}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def section(self, name: str, run: Callable[[], Any], needs_s: float) -> None:
        if self.left_s() < needs_s:
            self.data[name] = {"skipped": f"{self.left_s():.0f} s left of the budget, {needs_s:.0f} s needed"}
        else:
            clock = time.perf_counter()
            try:
                self.data[name] = run()
            except Exception as exc:  # a section's failure is its result; the others still run
                self.data[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            self.data[name]["section_seconds"] = round(time.perf_counter() - clock, 1)
        print(json.dumps({name: self.data[name]}), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.path, json.dumps(self.data, indent=2))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, run: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """The fastest of ``repeats`` runs after one warm-up, synchronised with the device."""
    result = run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        result = run()
        _sync(device)
        best = min(best, time.perf_counter() - clock)
    return best, result


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": device,
        "missing_packages": [
            n
            for n in ("ray", "rasterio", "zarr", "pydensecrf", "pydantic")
            if importlib.util.find_spec(n) is None
        ],
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        info |= {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1)}
    return info


def crf_section(device: str, side: int) -> dict[str, Any]:
    import torch

    from models.metadata import CRFParams
    from pipeline.crf.mean_field import TorchCRF

    arrays = np.load(INPUTS / "crf_windows.npz")
    meta = json.loads((INPUTS / "crf_windows.json").read_text())
    crf = TorchCRF(device)
    rows = []
    for name, recorded in meta.items():
        image = arrays[f"{name}/image"][:, :side, :side]
        probabilities = arrays[f"{name}/probabilities"][:, :side, :side].astype(np.float32)
        reference = arrays[f"{name}/labels"]
        params = CRFParams.model_validate(recorded["params"])
        p, i = (
            torch.from_numpy(np.ascontiguousarray(probabilities)).to(device),
            torch.from_numpy(np.ascontiguousarray(image)).to(device),
        )
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds, refined = _timed(device, partial(crf.refine_tensors, [p], [i], params, 255.0))
        megapixels = image.shape[1] * image.shape[2] / 1e6
        row: dict[str, Any] = {
            "window": name,
            "classes": int(probabilities.shape[0]),
            "megapixels": round(megapixels, 3),
            "torch_s": round(seconds, 4),
            "torch_mp_per_s": round(megapixels / seconds, 2),
        }
        if reference.shape == image.shape[1:]:  # the full window: pydensecrf2's labels apply
            labels = refined[0].argmax(0).cpu().numpy()
            cpu_s = recorded["pydensecrf_1_core_s"]
            row |= {
                "pydensecrf_1_core_s": cpu_s,
                "speedup_vs_pydensecrf_1_core": round(cpu_s / seconds, 1),
                "agreement": round(float((labels == reference).mean()), 5),
            }
        if device.startswith("cuda"):
            row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        half = image.shape[1] // 2
        cuts = [(slice(r, r + half), slice(c, c + half)) for r in (0, half) for c in (0, half)]
        batch = partial(
            crf.refine_tensors, [p[:, r, c] for r, c in cuts], [i[:, r, c] for r, c in cuts], params, 255.0
        )
        batch_s, _ = _timed(device, batch)
        row["batch_of_4_mp_per_s"] = round(megapixels / batch_s, 2)
        rows.append(row)
    return {"iterations": CRFParams().iterations, "rows": rows}


def _scene() -> np.ndarray:
    from PIL import Image

    return np.ascontiguousarray(
        np.moveaxis(np.asarray(Image.open(INPUTS / "scene.png").convert("RGB")), -1, 0)
    )


def _mosaic(side: int) -> np.ndarray:
    """The real scene mirrored edge to edge to side x side (as bench/engine.py's mosaics)."""
    return mirrored(_scene(), 0, side, side)


def amp_section(device: str, side: int) -> dict[str, Any]:
    import torch

    from pipeline.engine.workers import ModelWorker

    image = _mosaic(side)
    half = side // 2
    windows = [image[:, r : r + half, c : c + half] for r in (0, half) for c in (0, half)]
    result: dict[str, Any] = {"windows": len(windows), "window_side": half}
    labels = {}
    for amp in (False, True):
        worker = ModelWorker(str(MODEL), device=device, threads=None, amp=amp)
        seconds, out = _timed(device, partial(worker.predict, windows, (1.0,), "max", False))
        labels[amp] = np.stack(out)
        result[f"amp_{'on' if amp else 'off'}_mp_per_s"] = round(side * side / 1e6 / seconds, 2)
        del worker
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["label_agreement"] = round(float((labels[True] == labels[False]).mean()), 5)
    return result


def _model_actor_work(
    device: str, side: int, crf: bool, part: int, parts: int, budget_s: float
) -> dict[str, Any]:
    """One model actor's work over its share of the mosaic's windows: (megapixels of finished cores, s)."""
    from models.checkpoint import read_metadata
    from pipeline.engine.grid import DEFAULT_TILING, PendingCore, model_halo, plan_tiles
    from pipeline.engine.workers import ModelWorker, WindowSpec, read_windows, tiles_of, window_batches

    metadata = read_metadata(MODEL)
    image = _mosaic(side)
    tile = 512
    params = metadata.crf if crf else None
    halo = model_halo(metadata, params.sigma_alpha if params else None, tile)
    todo: list[PendingCore] = [
        (t, None) for t in plan_tiles(side, side, tile, halo, DEFAULT_TILING.cores_per_window)
    ]
    batches = window_batches(todo, 16)[part::parts]
    spec = WindowSpec(
        crf=params,
        input_max=metadata.input_max,
        crf_backend="torch",
        crf_device="gpu",
        batch_size=16,
        device=device,
    )
    worker = ModelWorker(str(MODEL), device=device, threads=None, amp=True)
    if not batches:  # a small mosaic has fewer batches than workers
        return {"megapixels": 0.0, "seconds": 0.0}
    worker.segment_cores(read_windows(image, batches[0]), tiles_of(batches[0]), spec)  # warm-up
    _sync(device)
    done_pixels, clock = 0, time.perf_counter()
    for batch in batches:
        cores = worker.segment_cores(read_windows(image, batch), tiles_of(batch), spec)
        done_pixels += sum(int(planes.shape[-1] * planes.shape[-2]) for window in cores for planes in window)
        if time.perf_counter() - clock > budget_s:
            break
    _sync(device)
    return {"megapixels": done_pixels / 1e6, "seconds": time.perf_counter() - clock}


def _in_process(job: dict[str, Any], answer: Any) -> None:
    answer.send(_model_actor_work(**job))


def model_actor_section(device: str, side: int, budget_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"mosaic_side": side, "tile": 512, "batch_size": 16, "amp": True}
    context = multiprocessing.get_context("spawn")
    for name, crf, parts in (("no_crf", False, 1), ("crf_gpu", True, 1), ("crf_gpu_two_workers", True, 2)):
        pipes, processes = [], []
        for part in range(parts):  # each in its own process, as Ray's actors are
            mine, theirs = context.Pipe()
            job = {
                "device": device,
                "side": side,
                "crf": crf,
                "part": part,
                "parts": parts,
                "budget_s": budget_s,
            }
            process = context.Process(target=_in_process, args=(job, theirs))
            process.start()
            pipes.append(mine)
            processes.append(process)
        shares = [pipe.recv() for pipe in pipes]
        for process in processes:
            process.join()
        megapixels = sum(s["megapixels"] for s in shares)
        seconds = max(max(s["seconds"] for s in shares), 1e-9)
        result[name] = {
            "megapixels": round(megapixels, 1),
            "seconds": round(seconds, 2),
            "mp_per_s": round(megapixels / seconds, 2),
        }
    best = max(result["crf_gpu"]["mp_per_s"], result["crf_gpu_two_workers"]["mp_per_s"])
    result |= {
        "target_mp_per_s_with_crf": TARGET_MP_PER_S,
        "target_met_by_the_model_actor": best >= TARGET_MP_PER_S,
    }
    return result


def ray_section(device: str, side: int, work: Path) -> dict[str, Any]:
    """``deeplab segment`` end to end (staging, Ray actors, ledger, publishing) where the packages exist."""
    missing = [n for n in ("ray", "rasterio", "zarr", "pydensecrf") if importlib.util.find_spec(n) is None]
    if missing:
        return {
            "skipped": f"not installed here: {', '.join(missing)} (Ray's wheel is over the device tool's "
            "64 MiB transfer limit)"
        }
    import rasterio

    from bench.engine import make_mosaic

    source = work / "scene.tif"
    scene = _scene()
    profile = {
        "driver": "GTiff",
        "count": 3,
        "dtype": "uint8",
        "height": scene.shape[1],
        "width": scene.shape[2],
    }
    with rasterio.open(source, "w", **profile) as sink:
        sink.write(scene)
    mosaic = make_mosaic(source, work / f"mosaic-{side}.tif", side)
    base = [
        "--device",
        device,
        "--tile",
        "512",
        "--batch-size",
        "16",
        "--engine",
        "ray",
        "--allow-ungeoreferenced",
    ]
    runs: dict[str, Any] = {}
    for name, flags in (
        ("no_crf", ["--no-crf"]),
        ("crf_gpu", ["--crf", "--crf-device", "gpu"]),
        ("crf_gpu_half", ["--crf", "--crf-device", "gpu", "--gpus-per-model-actor", "0.5"]),
    ):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "pipeline.cli", "segment", str(mosaic), "--model", str(MODEL)]
        done = subprocess.run(
            [*command, "--out", str(out), *base, *flags], cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            runs[name] = {"failed": done.stderr[-800:]}
            continue
        report = json.loads((out / mosaic.stem / "report.json").read_text())
        runs[name] = {
            "end_to_end_mp_per_s": report["megapixels_per_second"],
            "seconds": report["seconds"],
            "actors_started": (report.get("cluster") or {}).get("actors_started"),
        }
    return {"mosaic_side": side, "runs": runs}


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if not (INPUTS / "crf_windows.npz").exists():
        raise SystemExit(f"{INPUTS} is missing: run `python -m bench.gpu_check prepare` first (here)")
    args.work.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_check.json", started, args.budget_s)
    crf_side, amp_side, mosaic_side, actor_s = (
        (256, 512, 2048, 10.0) if args.smoke else (1024, 2048, 16384, 40.0)
    )
    report.section("environment", partial(environment, args.device), 0)
    report.section("crf", partial(crf_section, args.device, crf_side), 20)
    report.section("amp", partial(amp_section, args.device, amp_side), 15)
    report.section(
        "model_actor", partial(model_actor_section, args.device, mosaic_side, actor_s), 4 * actor_s
    )
    report.section("ray", partial(ray_section, args.device, mosaic_side, args.work), 60)
    print(f"wrote {report.path} in {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser(
        "prepare", help="here: inputs, wheels, the tree under the transfer limit"
    )
    prepare_parser.add_argument("--inputs-only", action="store_true", help="for a smoke run here")
    commands.add_parser("restore", help="here: the zoo checkpoints back from .gpu/aside")
    check = commands.add_parser("run", help="the check (on the GPU machine; --device cpu --smoke anywhere)")
    check.add_argument("--device", default="cuda")
    check.add_argument("--smoke", action="store_true", help="small sizes: the script's own check on a CPU")
    check.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "reports")))
    check.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    check.add_argument("--budget-s", type=float, default=270.0, help="sections that do not fit are skipped")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.inputs_only)
    elif args.command == "restore":
        restore()
    else:
        run(args)


if __name__ == "__main__":
    main()
