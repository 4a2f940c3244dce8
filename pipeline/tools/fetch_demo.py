"""Fetch the demo's inputs from their public origins, each checked against its pinned sha256, and assemble the
Kampala scene from its published chips: what ``make demo`` runs on a machine without ``../shared/data``.

The registry (``demo_inputs.json``) names each file's origin, its sha256 and where it goes; pooch downloads
each one under a temporary name and keeps it only when its hash matches, so a changed or truncated file at
the origin is refused, named, and never used. ``mirror`` replaces every origin with one base URL that serves
``<origin name>/<file>`` (a local copy, or a loopback server in the tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pooch
import rasterio
from rasterio.transform import from_bounds

from deeplab_common.atomic import atomic_output
from deeplab_common.digest import file_sha256
from deeplab_common.errors import DataError

REGISTRY = "demo_inputs.json"
CHIP = 256  # the published chips are 256x256 XYZ tiles


@dataclass(frozen=True, kw_only=True)
class DemoFile:
    url: str
    sha256: str
    to: str


def registry() -> dict[str, Any]:
    text = resources.files("pipeline.tools").joinpath(REGISTRY).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def demo_files(mirror: str | None = None) -> list[DemoFile]:
    """Every file to fetch, at its origin (or at ``mirror/<origin name>/<file>``)."""
    pinned = registry()
    bases = {
        name: f"{mirror.rstrip('/')}/{name}/" if mirror else base for name, base in pinned["origins"].items()
    }
    return [
        DemoFile(url=bases[entry["origin"]] + entry["name"], sha256=entry["sha256"], to=entry["to"])
        for entry in pinned["files"]
    ]


def fetch_demo(target: Path, mirror: str | None = None, progress: bool = False) -> list[Path]:
    """Every demo input under ``target`` (as laid out in ``../shared/data``); files already there with the
    right hash are kept. Returns the scene and slide paths the demo segments."""
    fetched = [_fetch(entry, target, progress) for entry in demo_files(mirror)]
    mosaics = [assemble_mosaic(target, spec) for spec in registry()["mosaics"]]
    return mosaics + [path for path in fetched if path.suffix == ".svs"]


def _fetch(entry: DemoFile, target: Path, progress: bool) -> Path:
    destination = target / entry.to
    if destination.is_file() and file_sha256(destination) == entry.sha256:
        return destination
    try:
        found = pooch.retrieve(
            entry.url,
            known_hash=f"sha256:{entry.sha256}",
            fname=destination.name,
            path=destination.parent,
            progressbar=progress,
        )
    except ValueError as error:  # pooch's word for a hash that does not match: the download is deleted
        raise DataError(f"{entry.url}: refused, not the pinned file ({_first_line(error)})") from None
    except Exception as error:  # requests' connection and HTTP errors
        raise DataError(f"{entry.url}: cannot be fetched ({_first_line(error)})") from None
    return Path(found)


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def assemble_mosaic(target: Path, spec: dict[str, Any]) -> Path:
    """The scene as published beside its chips: the XYZ chips side by side on one grid spanning their
    bounds, JPEG (YCbCr, quality as published) in 256-pixel tiles. Its pixels are the published scene's; its
    pixel height (the chips' union over the rows, each row of web-mercator tiles spanning a slightly
    different latitude) differs from the published file's in the eighth significant digit. Kept when it is
    already there (it is written atomically, so it is whole)."""
    destination = target / spec["to"]
    if destination.is_file():
        return destination
    chips = sorted(target.glob(spec["chips"]))
    if not chips:
        raise DataError(f"{target / spec['chips']}: no chips to assemble {destination.name} from")
    tiles = {_tile_index(chip): chip for chip in chips}
    columns = sorted({x for x, _ in tiles})
    rows = sorted({y for _, y in tiles})
    if len(tiles) != len(columns) * len(rows):
        raise DataError(
            f"{target / spec['chips']}: {len(tiles)} chips do not fill a {len(rows)}x{len(columns)} grid"
        )
    mosaic = np.zeros((3, len(rows) * CHIP, len(columns) * CHIP), dtype=np.uint8)
    corners = {}
    for (x, y), chip in tiles.items():
        with rasterio.open(chip) as dataset:
            top, left = rows.index(y) * CHIP, columns.index(x) * CHIP
            mosaic[:, top : top + CHIP, left : left + CHIP] = dataset.read()
            corners[(x, y)] = dataset.bounds
            crs = dataset.crs
    first, last = corners[(columns[0], rows[0])], corners[(columns[-1], rows[-1])]
    transform = from_bounds(first.left, last.bottom, last.right, first.top, mosaic.shape[2], mosaic.shape[1])
    profile = {
        "driver": "GTiff",
        "dtype": "uint8",
        "count": 3,
        "height": mosaic.shape[1],
        "width": mosaic.shape[2],
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": CHIP,
        "blockysize": CHIP,
        "compress": "jpeg",
        "photometric": "ycbcr",
        "jpeg_quality": spec["jpeg_quality"],
    }
    with atomic_output(destination) as temp, rasterio.open(temp, "w", **profile) as dataset:
        dataset.write(mosaic)
    return destination


def _tile_index(chip: Path) -> tuple[int, int]:
    """``OAM-{x}-{y}-{zoom}.tif`` -> (x, y)."""
    parts = chip.stem.split("-")
    try:
        return int(parts[-3]), int(parts[-2])
    except (IndexError, ValueError):
        raise DataError(f"{chip}: not named OAM-x-y-zoom, cannot place it in the mosaic") from None
