"""Ray Data with actor pools against the engine's actors with explicit backpressure, on the same work.

    python -m bench.ray_data [--scene PATH] [--model M] [--tile 128] [--rounds 2] [--no-crf]

Both run in one local Ray session over the same staged scene (the engine's staging), the same cores, the
same actor counts and resources (the engine's ActorPlan for this machine) and the same ModelWorker and
CRFWorker code; the two label rasters must be identical. Rounds alternate (engine, Ray Data, engine, ...)
so that drift on a noisy machine hits both. Results go to bench/reports/ray_data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_common.atomic import write_text_atomically
from models.checkpoint import read_metadata
from pipeline.engine.grid import (
    PendingCore,
    Tile,
    core_of,
    cores_to_compute,
    model_halo,
    plan_tiles,
    read_window,
)
from pipeline.engine.ledger import Ledger
from pipeline.engine.options import WHOLE_GPU
from pipeline.engine.stage import StagedStores, stage_scene
from pipeline.engine.workers import CRFWorker, ModelWorker, WindowSpec, window_batches
from pipeline.io.labels import NODATA_LABEL
from pipeline.ray.actor_pools import ActorPlan
from pipeline.ray.scheduler import CoreScheduler
from pipeline.ray.session import actor_pools, ray_session

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
SCENE = DATA / "landsat" / "RGB.byte.tif"
MODEL = ROOT / "models" / "zoo" / "landcover-dubai-lite0.safetensors"
REPORTS = ROOT / "bench" / "reports"


class ReadWindows:
    """Ray Data stage (an actor that keeps the zarr store open): a batch of same-shaped cores -> windows."""

    def __init__(self, image_folder: str) -> None:
        self.image = StagedStores.open_image(Path(image_folder))

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        tiles = [_tiles(json.loads(str(encoded))) for encoded in rows["tiles"]]
        windows = [np.stack([read_window(self.image, t) for t in group]) for group in tiles]
        return {"tiles": rows["tiles"], "windows": _ragged(windows)}


class ModelStage:
    """Ray Data actor stage: a batch of windows -> one row per window with its probabilities (or labels)."""

    def __init__(self, checkpoint: str, threads: int, spec: WindowSpec) -> None:
        self.worker = ModelWorker(checkpoint, device="cpu", threads=threads, amp=False)
        self.spec = spec

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tile": [], "window": [], "result": []}
        for encoded, windows in zip(rows["tiles"], rows["windows"], strict=True):
            tiles = _tiles(json.loads(str(encoded)))
            results = self.worker.predict_for(list(windows), self.spec)
            for tile, window, result in zip(tiles, windows, results, strict=True):
                out["tile"].append(json.dumps(_encode(tile)))
                out["window"].append(window)
                out["result"].append(result if self.spec.crf is not None else core_of(result, tile))
        return {
            "tile": np.array(out["tile"]),
            "window": _ragged(out["window"]),
            "result": _ragged(out["result"]),
        }


class CRFStage:
    """Ray Data actor stage: one window's probabilities -> the refined core's labels."""

    def __init__(self, spec: WindowSpec) -> None:
        self.worker = CRFWorker()
        self.spec = spec

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        assert self.spec.crf is not None
        planes = []
        for encoded, window, probabilities in zip(rows["tile"], rows["window"], rows["result"], strict=True):
            tile = Tile(**json.loads(str(encoded)))
            planes.append(
                self.worker.refine_core(probabilities, window, self.spec.crf, self.spec.input_max, tile)
            )
        return {"tile": rows["tile"], "result": _ragged(planes)}


def _encode(tile: Tile) -> dict[str, Any]:
    return {name: getattr(tile, name) for name in Tile.__dataclass_fields__}


def _tiles(encoded: list[dict[str, Any]]) -> list[Tile]:
    """Tiles back from JSON (which turns the block's tuple into a list)."""
    return [Tile(**(fields | {"block": fields["block"] and tuple(fields["block"])})) for fields in encoded]


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays whose shapes differ (edge windows): a variable-shape tensor column in Ray Data."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def run_ray_data(
    ray: Any, folder: Path, todo: list[PendingCore], checkpoint: Path, spec: WindowSpec, plan: ActorPlan
) -> np.ndarray:
    """The same cores through a Ray Data pipeline: read -> model -> CRF, each an actor pool."""
    import ray.data

    def pool(size: int) -> Any:
        return ray.data.ActorPoolStrategy(size=size)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [
        {"tiles": json.dumps([_encode(t) for cores in group for t, _ in cores])}
        for group in window_batches(todo, spec.batch_size)  # one core per window: planned without blocks
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    dataset = dataset.map_batches(
        ReadWindows, fn_constructor_args=(str(folder),), batch_size=1, compute=pool(1), num_cpus=0.1
    )
    dataset = dataset.map_batches(
        ModelStage,
        fn_constructor_args=(str(checkpoint), plan.model_threads, spec),
        batch_size=1,
        compute=pool(plan.model_actors),
        num_cpus=plan.model_cpus,
    )
    if spec.crf is not None:
        dataset = dataset.map_batches(
            CRFStage,
            fn_constructor_args=(spec,),
            batch_size=1,
            compute=pool(plan.crf_actors),
            num_cpus=plan.crf_cpus,
        )
    valid_of = {(t.row, t.col): v for t, v in todo}
    labels = None
    for row in dataset.iter_rows():
        tile = Tile(**json.loads(row["tile"]))
        planes = np.asarray(row["result"])[:1]
        if labels is None:
            labels = np.full((tile.scene_height, tile.scene_width), NODATA_LABEL, np.uint8)
        valid = valid_of[(tile.row, tile.col)]
        if valid is not None:
            planes = np.where(valid, planes, NODATA_LABEL)
        labels[
            tile.core_top : tile.core_top + tile.core_height,
            tile.core_left : tile.core_left + tile.core_width,
        ] = planes[0]
    assert labels is not None
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", type=Path, default=SCENE)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-crf", action="store_true")
    parser.add_argument("--report", type=Path, default=REPORTS / "ray_data")
    args = parser.parse_args(argv)

    metadata = read_metadata(args.model)
    crf = None if args.no_crf else metadata.crf
    cpus = os.cpu_count() or 1
    plan = ActorPlan.for_resources(cpus, 0, crf is not None)
    spec = WindowSpec(crf=crf, input_max=metadata.input_max, amp=False, batch_size=2)
    work = Path(tempfile.mkdtemp(prefix="dlb-rd-"))
    try:
        staged = stage_scene(args.scene, work / ".work", args.tile)
        height, width = staged.shape
        halo = model_halo(metadata, crf.sigma_alpha if crf else None, args.tile)
        todo, skipped = cores_to_compute(plan_tiles(height, width, args.tile, halo), staged.valid())
        times: dict[str, list[float]] = {"engine": [], "ray_data": []}
        masks: dict[str, np.ndarray] = {}
        with ray_session(work, num_cpus=cpus) as ray:
            for round_index in range(args.rounds):
                ledger_folder = work / f"ledger-{round_index}"
                ledger = Ledger(ledger_folder, "bench", (height, width), args.tile)
                started = time.perf_counter()
                with actor_pools(ray, args.model, spec, WHOLE_GPU) as pools:
                    CoreScheduler(ray, staged.image(), todo, ledger, spec, pools).run()
                times["engine"].append(time.perf_counter() - started)
                masks["engine"] = np.asarray(ledger.labels()[:])
                started = time.perf_counter()
                masks["ray_data"] = run_ray_data(ray, staged.folder, todo, args.model, spec, plan)
                times["ray_data"].append(time.perf_counter() - started)
                shutil.rmtree(ledger_folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    identical = bool(np.array_equal(masks["engine"], masks["ray_data"]))
    engine_s, data_s = statistics.median(times["engine"]), statistics.median(times["ray_data"])
    result = {
        "scene": args.scene.name,
        "model": args.model.name,
        "shape": [height, width],
        "tile": args.tile,
        "halo": halo,
        "crf": crf is not None,
        "cores": len(todo),
        "cores_nodata": skipped,
        "actor_plan": plan.__dict__,
        "seconds": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
        "median_seconds": {"engine": round(engine_s, 2), "ray_data": round(data_s, 2)},
        "engine_speedup": round(data_s / engine_s, 3),
        "masks_identical": identical,
        "machine": {"cpus": cpus, "python": platform.python_version()},
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.report.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text_atomically(args.report.with_suffix(".md"), _markdown(result))
    print(json.dumps(result, indent=2))
    return 0 if identical else 1


def _markdown(result: dict[str, Any]) -> str:
    seconds, median = result["seconds"], result["median_seconds"]
    crf = "on" if result["crf"] else "off"
    return "\n".join(
        [
            "# Ray Data (actor pools) vs the engine's actors with explicit backpressure",
            "",
            f"{result['scene']} ({result['shape'][0]}x{result['shape'][1]}), {result['model']}, "
            f"{result['cores']} cores of {result['tile']} px, halo {result['halo']}, CRF {crf}; "
            f"actors per the engine's plan: {result['actor_plan']}. "
            "Same local Ray session, rounds alternated.",
            "",
            "| pipeline | seconds per round | median |",
            "|---|---|---|",
            f"| engine (actors, explicit backpressure) | {seconds['engine']} | {median['engine']} |",
            f"| Ray Data (map_batches, actor pools) | {seconds['ray_data']} | {median['ray_data']} |",
            "",
            f"Engine speed-up: {result['engine_speedup']}x; masks identical: {result['masks_identical']}.",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
