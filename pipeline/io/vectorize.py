"""Polygons per class from a published mask: a GeoPackage in a scene's CRS, or QuPath GeoJSON for a slide.

Streamed block by block: a polygon wholly inside its block is written at once; the pieces that touch an
inner block border are kept (in exact pixel coordinates, so neighbours share edges exactly) and merged across
borders at the end. Nodata (255) never becomes a polygon.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyogrio
import shapely
import shapely.affinity
import shapely.geometry
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.transform import Affine

from models.atomic import atomic_output
from models.metadata import ClassInfo
from pipeline.engine.ledger import NODATA_LABEL

LAYER = "classes"
FLUSH_EVERY = 5000  # polygons buffered before an append to the GeoPackage


def vectorize_mask(
    labels: Any,
    classes: Sequence[ClassInfo],
    crs: CRS | None,
    transform: Affine,
    out: Path,
    block: int = 1024,
    qupath: bool = False,
) -> dict[str, int]:
    """Write one polygon feature per connected class region (4-connected); returns polygons per class.

    ``qupath``: GeoJSON annotations with QuPath's classification (name and colour) instead of a GeoPackage;
    ``transform`` then maps mask pixels to the slide's level-0 pixels.
    """
    height, width = labels.shape
    counts = dict.fromkeys((c.name for c in classes), 0)
    pending: dict[int, list[shapely.Geometry]] = {}
    with atomic_output(out) as temp:
        writer: _Writer = (
            _QuPathWriter(temp, classes, transform, counts)
            if qupath
            else _GeoPackageWriter(temp, classes, crs, transform, counts)
        )
        for top in range(0, height, block):
            rows = np.asarray(labels[top : top + block])
            for left in range(0, width, block):
                part = np.ascontiguousarray(rows[:, left : left + block])
                for value, polygon in _polygons(part, top, left):
                    bounds = polygon.bounds
                    touches_inner_border = (
                        (bounds[0] == left and left > 0)
                        or (bounds[2] == left + part.shape[1] and left + part.shape[1] < width)
                        or (bounds[1] == top and top > 0)
                        or (bounds[3] == top + part.shape[0] and top + part.shape[0] < height)
                    )
                    if touches_inner_border:
                        pending.setdefault(value, []).append(polygon)
                    else:
                        writer.add(value, polygon)
        for value, pieces in sorted(pending.items()):
            merged = shapely.union_all(pieces)
            for polygon in shapely.get_parts(merged):
                writer.add(value, polygon)
        writer.flush(final=True)
    return counts


def _polygons(part: np.ndarray, top: int, left: int) -> Iterable[tuple[int, shapely.Geometry]]:
    """Polygons of one block in scene pixel coordinates (exact integers: pieces meet edge to edge)."""
    valid = part != NODATA_LABEL
    if not valid.any():
        return
    offset = Affine.translation(left, top)
    for geometry, value in shapes(part, mask=valid, connectivity=4, transform=offset):
        yield int(value), shapely.geometry.shape(geometry)


class _Writer(Protocol):
    def add(self, value: int, polygon: shapely.Geometry) -> None: ...

    def flush(self, final: bool = False) -> None: ...


class _QuPathWriter:
    """Streams a GeoJSON FeatureCollection of QuPath annotations (classification name and colour)."""

    def __init__(
        self, path: Path, classes: Sequence[ClassInfo], transform: Affine, counts: dict[str, int]
    ) -> None:
        self.classes = classes
        self.matrix = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
        self.counts = counts
        self.handle = open(path, "w")  # noqa: SIM115 - closed by the final flush
        self.handle.write('{"type": "FeatureCollection", "features": [\n')
        self.first = True

    def add(self, value: int, polygon: shapely.Geometry) -> None:
        info = self.classes[value]
        placed = shapely.affinity.affine_transform(polygon, self.matrix)
        feature = {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(placed),
            "properties": {
                "objectType": "annotation",
                "classification": {"name": info.name, "color": list(info.color)},
                "pixels": round(polygon.area),
            },
        }
        self.handle.write(("" if self.first else ",\n") + json.dumps(feature))
        self.first = False
        self.counts[info.name] += 1

    def flush(self, final: bool = False) -> None:
        if final:
            self.handle.write("\n]}\n")
            self.handle.close()


class _GeoPackageWriter:
    """Buffers polygons and appends them to the GeoPackage layer in map coordinates."""

    def __init__(
        self,
        path: Path,
        classes: Sequence[ClassInfo],
        crs: CRS | None,
        transform: Affine,
        counts: dict[str, int],
    ) -> None:
        self.path = path
        self.classes = classes
        self.crs = crs.to_wkt() if crs else None
        self.matrix = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
        self.counts = counts
        self.values: list[int] = []
        self.geometries: list[shapely.Geometry] = []
        self.started = False

    def add(self, value: int, polygon: shapely.Geometry) -> None:
        self.values.append(value)
        self.geometries.append(polygon)
        self.counts[self.classes[value].name] += 1
        if len(self.values) >= FLUSH_EVERY:
            self.flush()

    def flush(self, final: bool = False) -> None:
        if not self.values and (self.started or not final):
            return
        if not self.started:
            self.path.unlink(missing_ok=True)  # the atomic placeholder: GDAL creates the GeoPackage itself
        placed = [shapely.affinity.affine_transform(g, self.matrix) for g in self.geometries]
        pixels = [round(g.area) for g in self.geometries]
        pyogrio.raw.write(
            self.path,
            geometry=np.array(shapely.to_wkb(placed), dtype=object),
            field_data=[
                np.array(self.values, dtype=np.int32),
                np.array([self.classes[v].name for v in self.values], dtype=object),
                np.array(pixels, dtype=np.int64),
            ],
            fields=["class_id", "class_name", "pixels"],
            layer=LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            crs=self.crs,
            append=self.started,
        )
        self.started = True
        self.values, self.geometries = [], []
