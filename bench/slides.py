"""Benchmark: peak memory of a slide run, small real slide against a >= 40k x 40k synthetic pyramid.

    python -m bench.slides [--size 40960] [--mpp 0.125] [--model M] [--options "--no-crf --halo 64"]

The large slide is the real CMU-1 slide tiled (mirrored edge to edge) into a tiled, JPEG-compressed
pyramidal OME-TIFF; each level is tiled from the source downsampled once, so writing it never holds more
than the source image. Both slides run through `deeplab segment` in their own process with the same
model and options; peak RSS of the driver and of each actor come from their reports. Results go to
bench/reports/slides.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from bench.engine import run_engine
from deeplab_common.atomic import write_text_atomically
from pipeline.io.slides import open_slide

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEEPLAB_DATA", ROOT.parent / "shared" / "data"))
SMALL = DATA / "wsi" / "CMU-1-Small-Region.svs"
MODEL = ROOT / "models" / "zoo" / "he-stain-cmu.safetensors"
REPORTS = ROOT / "bench" / "reports"
TILE = 512


def _mirrored_tiles(source: np.ndarray, size: int, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of a size x size image that repeats ``source`` mirrored (no seams at its edges)."""
    height, width = source.shape[:2]
    rows = np.arange(size)
    cols = np.arange(size)
    # index into the source, reflected at each repetition: 0..h-1, h-1..0, 0..h-1, ...
    row_index = np.abs((rows + height) % (2 * height) - height)
    row_index = np.minimum(row_index, height - 1)
    col_index = np.minimum(np.abs((cols + width) % (2 * width) - width), width - 1)
    for top in range(0, size, tile):
        for left in range(0, size, tile):
            block = np.full((tile, tile, 3), 255, dtype=np.uint8)
            r = row_index[top : top + tile]
            c = col_index[left : left + tile]
            block[: len(r), : len(c)] = source[np.ix_(r, c)]
            yield block


def make_synthetic_slide(out: Path, size: int, mpp: float) -> Path:
    """A size x size pyramidal OME-TIFF (levels /4 until one tile) of the real slide, JPEG tiles."""
    if out.exists():
        return out
    with open_slide(SMALL) as slide:
        width, height = slide.level_dimensions[0]
        source = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    levels = [size]
    while levels[-1] // 4 > TILE:
        levels.append(levels[-1] // 4)
    partial = out.with_name(f".{out.name}.partial")
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tiff:
        for index, level_size in enumerate(levels):
            factor = size // level_size
            small = source if factor == 1 else _shrink(source, factor)
            tiff.write(
                _mirrored_tiles(small, level_size, TILE),
                shape=(level_size, level_size, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subifds=len(levels) - 1 if index == 0 else None,
                subfiletype=1 if index else 0,
                resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)),
                resolutionunit="CENTIMETER",
                metadata=metadata if index == 0 else None,
            )
    partial.rename(out)
    return out


def _shrink(source: np.ndarray, factor: int) -> np.ndarray:
    height, width = source.shape[:2]
    size = (max(1, width // factor), max(1, height // factor))
    return np.asarray(Image.fromarray(source).resize(size, Image.Resampling.BOX))


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "slide_levels": report["slide"]["levels"],
        "level_read": report["slide"]["level_read"],
        "working_mpp": report["slide"]["working_mpp"],
        "model_grid": report["model_grid"],
        "tiles": report["tiles"],
        "tissue_area_mm2": report["tissue_area_mm2"],
        "seconds": report["seconds"],
        "peak_rss_mb": report["peak_rss_mb"],
    }


def _peak(report: dict[str, Any]) -> float:
    """The largest single process: the driver or any actor."""
    peaks = report["peak_rss_mb"]
    values = [peaks["driver"], *[v for key, vs in peaks.items() if key != "driver" for v in vs]]
    return float(max(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=40960, help="side of the synthetic slide, pixels")
    parser.add_argument(
        "--mpp", type=float, default=0.125, help="the synthetic slide's level-0 µm/px (level 1 is 4x coarser)"
    )
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "slides")
    parser.add_argument(
        "--options", default="--no-crf --halo 64", help="`deeplab segment` flags for both runs (one string)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    big = make_synthetic_slide(
        args.work / f"synthetic-{args.size}-{args.mpp:g}um.ome.tif", args.size, args.mpp
    )
    made = time.perf_counter() - started
    options = shlex.split(args.options)
    small = run_engine(SMALL, args.model, args.work / "out-small", *options)
    large = run_engine(big, args.model, args.work / "out-large", *options)
    ratio = _peak(large) / _peak(small)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": args.model.name,
        "options": options,
        "synthetic": {
            "size": args.size,
            "mpp": args.mpp,
            "bytes": big.stat().st_size,
            "seconds_to_make": made,
        },
        "small": _summary(small),
        "large": _summary(large),
        "peak_rss_ratio_large_over_small": round(ratio, 3),
        "target": "<= 1.5",
        "met": ratio <= 1.5,
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    write_text_atomically(REPORTS / "slides.json", json.dumps(result, indent=2))
    lines = [
        "# Slide memory benchmark (`python -m bench.slides`)",
        "",
        f"Model {args.model.name}, options `{args.options or '(none)'}`, {os.cpu_count()} CPUs; "
        f"the synthetic slide is {args.size}² px at {args.mpp:g} µm/px (level 0), "
        f"{big.stat().st_size / 1e6:.0f} MB.",
        "",
        "| slide | level-0 px | levels | level read | working grid | cores computed / skipped | tissue mm² "
        "| seconds | peak RSS driver / actors (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, report in (
        ("CMU-1-Small-Region (real)", small),
        (f"synthetic {args.size}² (tiled CMU-1)", large),
    ):
        peaks = report["peak_rss_mb"]
        actors = ", ".join(f"{v:.0f}" for key, vs in peaks.items() if key != "driver" for v in vs)
        levels, tiles = report["slide"]["levels"], report["tiles"]
        lines.append(
            f"| {name} | {levels[0][0]}x{levels[0][1]} | {len(levels)} | {report['slide']['level_read']} "
            f"| {report['model_grid'][1]}x{report['model_grid'][0]} "
            f"| {tiles['computed']} / {tiles['skipped']} | {report['tissue_area_mm2']:.1f} "
            f"| {report['seconds']['total']:.0f} | {peaks['driver']:.0f} / {actors} |"
        )
    verdict = "met" if ratio <= 1.5 else "not met"
    lines += ["", f"Largest process, large / small: **{ratio:.2f}x** (target <= 1.5: {verdict})."]
    write_text_atomically(REPORTS / "slides.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
