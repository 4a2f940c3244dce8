"""Segment one georeferenced scene into a class mask GeoTIFF (single process, windowed, bounded memory).

Reads core+halo windows straight from the source, predicts, optionally refines each window with the dense
CRF, writes cores into a tiled GeoTIFF with the source's CRS and transform, then publishes it as a
Cloud-Optimized GeoTIFF (mode overviews, colour table, provenance tags) by an atomic rename.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import torch
from pydantic import BaseModel, ConfigDict, Field
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from models.atomic import atomic_output, write_text_atomically
from models.checkpoint import LoadedModel, load_checkpoint
from models.errors import DataError
from models.inference import normalise, pick_device, predict_probabilities
from models.metadata import CRFParams
from models.version import software_version
from pipeline.crf import refine
from pipeline.grid import Tile, batches, core_of, pad_reflect, plan_tiles

NODATA_LABEL = 255


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tile: int = Field(512, ge=16)
    halo: int = Field(64, ge=0)
    crf: bool = True
    crf_params: CRFParams | None = None
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    allow_ungeoreferenced: bool = False


@dataclass
class SegmentResult:
    scene: Path
    mask: Path
    report: Path
    tiles_total: int
    tiles_skipped: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def open_scene(path: Path) -> rasterio.io.DatasetReader:
    if not Path(path).exists():
        raise DataError(f"{path}: scene does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: not a readable raster ({exc})") from None


def preflight(dataset: rasterio.io.DatasetReader, loaded: LoadedModel, options: SegmentOptions) -> None:
    path, metadata = dataset.name, loaded.metadata
    problems = []
    if dataset.count != metadata.num_bands:
        problems.append(f"has {dataset.count} band(s) but the model expects {metadata.num_bands}")
    if (dataset.crs is None or dataset.transform.is_identity) and not options.allow_ungeoreferenced:
        problems.append("has no CRS/transform (use --allow-ungeoreferenced to segment it anyway)")
    if problems:
        raise DataError("; ".join(f"{path}: {p}" for p in problems))


def read_window(dataset: rasterio.io.DatasetReader, tile: Tile) -> np.ndarray:
    top, left, height, width = tile.window
    inner_top, inner_left = max(top, 0), max(left, 0)
    inner_bottom, inner_right = min(top + height, dataset.height), min(left + width, dataset.width)
    inner = dataset.read(
        window=Window(inner_left, inner_top, inner_right - inner_left, inner_bottom - inner_top)
    )
    return pad_reflect(
        inner, (inner_top - top, top + height - inner_bottom), (inner_left - left, left + width - inner_right)
    )


def core_valid(dataset: rasterio.io.DatasetReader, tile: Tile) -> np.ndarray:
    """True where the source has data (nodata value, alpha band or internal mask all honoured)."""
    window = Window(tile.core_left, tile.core_top, tile.core_width, tile.core_height)
    return np.asarray(dataset.dataset_mask(window=window)) > 0


def segment_scene(scene: Path, checkpoint: Path, out_dir: Path, options: SegmentOptions) -> SegmentResult:
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, device=pick_device(options.device))
    metadata = loaded.metadata
    crf_params = options.crf_params or metadata.crf
    target = Path(out_dir) / Path(scene).stem
    with open_scene(scene) as dataset:
        preflight(dataset, loaded, options)
        tiles = plan_tiles(dataset.height, dataset.width, options.tile, options.halo)
        profile = {
            "driver": "GTiff",
            "height": dataset.height,
            "width": dataset.width,
            "count": 1,
            "dtype": "uint8",
            "crs": dataset.crs,
            "transform": dataset.transform,
            "nodata": NODATA_LABEL,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        }
        skipped = 0
        class_pixels = np.zeros(metadata.num_classes, dtype=np.int64)
        target.mkdir(parents=True, exist_ok=True)
        with (
            atomic_output(target / "mask.tif") as published,
            tempfile.TemporaryDirectory(prefix=".stage-", dir=target) as stage_dir,
        ):
            stage = Path(stage_dir) / "labels.tif"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                sink = rasterio.open(stage, "w", **profile)
            with sink:
                for group in batches(tiles, options.batch_size):
                    valids = [core_valid(dataset, t) for t in group]
                    work = [(t, v) for t, v in zip(group, valids, strict=True) if v.any()]
                    skipped += len(group) - len(work)
                    for t, v in zip(group, valids, strict=True):
                        if not v.any():
                            sink.write(
                                np.full((1, t.core_height, t.core_width), NODATA_LABEL, np.uint8),
                                window=Window(t.core_left, t.core_top, t.core_width, t.core_height),
                            )
                    for tile, valid, labels in _predict_group(dataset, loaded, work, options, crf_params):
                        labels = np.where(valid, labels, NODATA_LABEL).astype(np.uint8)
                        class_pixels += np.bincount(labels[valid].ravel(), minlength=metadata.num_classes)[
                            : metadata.num_classes
                        ]
                        sink.write(
                            labels[None],
                            window=Window(tile.core_left, tile.core_top, tile.core_width, tile.core_height),
                        )
                sink.write_colormap(1, _colormap(loaded))
                sink.update_tags(**_provenance(loaded, options, crf_params, scene))
            rasterio.shutil.copy(
                stage, published, driver="COG", compress="deflate", overview_resampling="mode", blocksize=512
            )
        seconds = time.perf_counter() - started
        details = {
            "scene": str(scene),
            "shape": [dataset.height, dataset.width],
            "crs": dataset.crs.to_string() if dataset.crs else None,
            "tiles": {"total": len(tiles), "computed": len(tiles) - skipped, "skipped": skipped},
            "class_pixels": {c.name: int(n) for c, n in zip(metadata.classes, class_pixels, strict=True)},
            "model": metadata.architecture,
            "checkpoint_sha256": loaded.sha256,
            "seconds": round(seconds, 2),
            "megapixels_per_second": round(dataset.height * dataset.width / 1e6 / seconds, 3),
            "crf": crf_params.model_dump() if options.crf else None,
        }
    report = target / "report.json"
    write_text_atomically(report, json.dumps(details, indent=2))
    return SegmentResult(Path(scene), target / "mask.tif", report, len(tiles), skipped, seconds, details)


def _predict_group(
    dataset: rasterio.io.DatasetReader,
    loaded: LoadedModel,
    work: list[tuple[Tile, np.ndarray]],
    options: SegmentOptions,
    crf_params: CRFParams,
) -> list[tuple[Tile, np.ndarray, np.ndarray]]:
    """Windows of equal size are batched through the model; each is refined and cropped to its core."""
    results = []
    by_shape: dict[tuple[int, int], list[tuple[Tile, np.ndarray, np.ndarray]]] = {}
    for tile, valid in work:
        window = read_window(dataset, tile)
        by_shape.setdefault(window.shape[-2:], []).append((tile, valid, window))
    for items in by_shape.values():
        batch = np.stack([normalise(window, loaded.metadata.bands).numpy() for _, _, window in items])
        probabilities = predict_probabilities(loaded.model, torch.from_numpy(batch), scales=options.scales)
        for (tile, valid, window), probs in zip(items, probabilities.cpu().numpy(), strict=True):
            if options.crf:
                probs = refine(probs, window, crf_params, loaded.metadata.input_max)
            results.append((tile, valid, core_of(probs, tile).argmax(0).astype(np.uint8)))
    return results


def _colormap(loaded: LoadedModel) -> dict[int, tuple[int, int, int, int]]:
    colours = {i: (*c.color, 255) for i, c in enumerate(loaded.metadata.classes)}
    colours[NODATA_LABEL] = (0, 0, 0, 0)
    return colours


def _provenance(
    loaded: LoadedModel, options: SegmentOptions, crf_params: CRFParams, scene: Path
) -> dict[str, str]:
    metadata = loaded.metadata
    return {
        "DEEPLAB_MODEL": metadata.architecture,
        "DEEPLAB_CHECKPOINT": loaded.path.name,
        "DEEPLAB_CHECKPOINT_SHA256": loaded.sha256,
        "DEEPLAB_CLASSES": json.dumps([c.name for c in metadata.classes]),
        "DEEPLAB_CRF": json.dumps(crf_params.model_dump()) if options.crf else "off",
        "DEEPLAB_TILE": str(options.tile),
        "DEEPLAB_HALO": str(options.halo),
        "DEEPLAB_SOURCE": Path(scene).name,
        "DEEPLAB_VERSION": software_version(),
    }
