"""Polygons per class from a published mask, drawn as GIS and pathology tools take them: a GeoPackage in a
scene's CRS, or QuPath GeoJSON in a slide's level-0 pixels.

Streamed block by block. Each block is first sieved: connected regions under the minimum area are merged into
their largest neighbour (GDAL's sieve), read with a halo as wide as that area so that a region cut by the
block's border is never mistaken for a small one. The block's regions are then simplified together as one
coverage (shapely's coverage simplification, inner edges only), so neighbours keep sharing their edges exactly
and the block's border and the nodata edges stay where the pixels put them. A polygon wholly inside its block
is written at once; the pieces that touch an inner block border are merged across borders at the end. Nodata
(255) never becomes a polygon, and classes the checkpoint marks as background are left out unless asked.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import shapely
import shapely.affinity
import shapely.geometry
from rasterio.crs import CRS
from rasterio.features import shapes, sieve
from rasterio.transform import Affine

from deeplab_common.atomic import atomic_output
from models.metadata import ClassInfo
from models.object_metrics import MIN_REGION_PIXELS
from pipeline.io.labels import NODATA_LABEL

LAYER = "classes"
FLUSH_EVERY = 5000  # polygons buffered before an append to the GeoPackage
DEFAULT_MIN_PIXELS = MIN_REGION_PIXELS  # merged into their neighbour unless a minimum area is given
# Outlines move by at most about a pixel: the staircase of pixel edges becomes the line through it.
SIMPLIFY_PX = 0.75


@dataclass(frozen=True)
class PolygonRules:
    """What becomes a polygon and how it is measured: in mask pixels, with areas in the writer's unit."""

    classes: Sequence[ClassInfo]
    pixel_areas: np.ndarray | None  # area of one mask pixel in each row, in the writer's unit; None: unknown
    min_pixels: int = DEFAULT_MIN_PIXELS
    simplify_px: float = SIMPLIFY_PX
    keep_background: bool = False

    @classmethod
    def for_area(
        cls,
        classes: Sequence[ClassInfo],
        pixel_areas: np.ndarray | None,
        min_area: float | None,
        keep_background: bool = False,
    ) -> PolygonRules:
        """Rules whose minimum area is ``min_area`` in the writer's unit (None: the default pixel count)."""
        min_pixels = DEFAULT_MIN_PIXELS
        if min_area is not None and pixel_areas is not None and len(pixel_areas):
            min_pixels = max(1, int(np.ceil(min_area / float(np.median(pixel_areas)))))
        return cls(classes, pixel_areas, min_pixels, SIMPLIFY_PX, keep_background)

    def written(self, value: int) -> bool:
        return value < len(self.classes) and (
            self.keep_background or self.classes[value].role != "background"
        )

    def area(self, polygon: shapely.Geometry) -> float | None:
        """``polygon``'s area (mask pixels) in the writer's unit, at the pixel size of its centroid's row."""
        if self.pixel_areas is None:
            return None
        row = int(np.clip(polygon.centroid.y, 0, len(self.pixel_areas) - 1))
        return float(polygon.area * self.pixel_areas[row])

    def describe(self, unit: str) -> dict[str, object]:
        """The rules as the report states them."""
        typical = float(np.median(self.pixel_areas)) if self.pixel_areas is not None else None
        return {
            "min_pixels": self.min_pixels,
            f"min_area_{unit}": None if typical is None else round(self.min_pixels * typical, 6),
            "simplified_px": self.simplify_px,
            "left_out": [c.name for v, c in enumerate(self.classes) if not self.written(v)],
        }


class PolygonWriter(ABC):
    """Writes one output format's features; ``transform`` maps mask pixels to its coordinates."""

    unit: str  # the unit of the rules' pixel areas for this format

    def __init__(self, path: Path, rules: PolygonRules, transform: Affine, crs: CRS | None) -> None:
        self.path = path
        self.rules = rules
        self.matrix = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
        self.crs = crs
        self.counts = {c.name: 0 for v, c in enumerate(rules.classes) if rules.written(v)}

    def add(self, value: int, polygon: shapely.Geometry) -> None:
        self.counts[self.rules.classes[value].name] += 1
        self.write(value, polygon, shapely.affinity.affine_transform(polygon, self.matrix))

    @abstractmethod
    def write(self, value: int, pixels: shapely.Geometry, placed: shapely.Geometry) -> None:
        """One polygon: in mask pixels (for its area) and placed in the format's coordinates."""

    @abstractmethod
    def close(self) -> None: ...


class QuPathWriter(PolygonWriter):
    """A GeoJSON FeatureCollection as QuPath imports it: ``objectType`` (``detection`` for classes of small
    objects, else ``annotation``), ``classification`` with name and colour, ``measurements`` with the area."""

    unit = "um2"

    def __init__(self, path: Path, rules: PolygonRules, transform: Affine, crs: CRS | None) -> None:
        super().__init__(path, rules, transform, crs)
        self.handle = open(path, "w")  # noqa: SIM115 - closed by close()
        self.handle.write('{"type": "FeatureCollection", "features": [\n')
        self.first = True

    def write(self, value: int, pixels: shapely.Geometry, placed: shapely.Geometry) -> None:
        info = self.rules.classes[value]
        area = self.rules.area(pixels)
        feature = {
            "type": "Feature",
            "geometry": shapely.geometry.mapping(placed),
            "properties": {
                "objectType": "detection" if info.role == "object" else "annotation",
                "classification": {"name": info.name, "color": list(info.color)},
                "measurements": {} if area is None else {"Area µm^2": round(area, 3)},
            },
        }
        self.handle.write(("" if self.first else ",\n") + json.dumps(feature, ensure_ascii=False))
        self.first = False

    def close(self) -> None:
        self.handle.write("\n]}\n")
        self.handle.close()


class GeoPackageWriter(PolygonWriter):
    """Buffers polygons and appends them to the GeoPackage layer in map coordinates, with class and area."""

    unit = "m2"

    def __init__(self, path: Path, rules: PolygonRules, transform: Affine, crs: CRS | None) -> None:
        super().__init__(path, rules, transform, crs)
        self.rows: list[tuple[int, shapely.Geometry, float]] = []
        self.started = False

    def write(self, value: int, pixels: shapely.Geometry, placed: shapely.Geometry) -> None:
        area = self.rules.area(pixels)
        self.rows.append((value, placed, np.nan if area is None else area))
        if len(self.rows) >= FLUSH_EVERY:
            self._append()

    def close(self) -> None:
        if self.rows or not self.started:
            self._append()

    def _append(self) -> None:
        if not self.started:
            self.path.unlink(missing_ok=True)  # the atomic placeholder: GDAL creates the GeoPackage itself
        values = [value for value, _, _ in self.rows]
        with warnings.catch_warnings():  # an ungeoreferenced scene's polygons are in pixels: no CRS to give
            warnings.filterwarnings("ignore", "'crs' was not provided")
            self._write(values)
        self.started = True
        self.rows = []

    def _write(self, values: list[int]) -> None:
        pyogrio.raw.write(
            self.path,
            geometry=np.array(shapely.to_wkb([placed for _, placed, _ in self.rows]), dtype=object),
            field_data=[
                np.array(values, dtype=np.int32),
                np.array([self.rules.classes[v].name for v in values], dtype=object),
                np.array([area for _, _, area in self.rows], dtype=np.float64),
            ],
            fields=["class_id", "class_name", "area_m2"],
            layer=LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            crs=self.crs.to_wkt() if self.crs else None,
            append=self.started,
        )


def vectorize_mask(
    labels: np.ndarray,
    rules: PolygonRules,
    writer_class: type[PolygonWriter],
    transform: Affine,
    crs: CRS | None,
    out: Path,
    block: int = 1024,
) -> dict[str, int]:
    """Write one polygon feature per connected region (4-connected) of each written class; returns polygons
    per written class. ``transform`` maps mask pixels to the writer's coordinates."""
    height, width = labels.shape
    pending: dict[int, list[shapely.Geometry]] = {}
    with atomic_output(out) as temp:
        writer = writer_class(temp, rules, transform, crs)
        for top, left, polygons in _simplified_blocks(labels, rules, block):
            for value, original, simplified in polygons:
                if not rules.written(value):
                    continue
                x0, y0, x1, y1 = original.bounds
                touches_inner_border = (
                    (x0 == left and left > 0)
                    or (x1 == min(left + block, width) and left + block < width)
                    or (y0 == top and top > 0)
                    or (y1 == min(top + block, height) and top + block < height)
                )
                if touches_inner_border:
                    pending.setdefault(value, []).append(simplified)
                else:
                    writer.add(value, simplified)
        for value, pieces in sorted(pending.items()):
            for polygon in shapely.get_parts(shapely.union_all(pieces)):
                writer.add(value, polygon)
        writer.close()
    return writer.counts


def _simplified_blocks(
    labels: np.ndarray, rules: PolygonRules, block: int
) -> Iterator[tuple[int, int, list[tuple[int, shapely.Geometry, shapely.Geometry]]]]:
    """Each block's regions after the sieve: (value, polygon, simplified polygon) in scene pixels."""
    height, width = labels.shape
    halo = rules.min_pixels if rules.min_pixels > 1 else 0  # a region of fewer pixels fits within it
    for top in range(0, height, block):
        band_top = max(0, top - halo)
        rows = np.asarray(labels[band_top : top + block + halo])
        for left in range(0, width, block):
            window_left = max(0, left - halo)
            window = np.ascontiguousarray(rows[:, window_left : left + block + halo])
            if halo:
                window = sieve(window, rules.min_pixels, mask=window != NODATA_LABEL, connectivity=4)
            core = np.ascontiguousarray(
                window[
                    top - band_top : top - band_top + block, left - window_left : left - window_left + block
                ]
            )
            found = list(_polygons(core, top, left))
            if not found:
                continue
            simplified = shapely.coverage_simplify(
                np.array([polygon for _, polygon in found], dtype=object),
                rules.simplify_px,
                simplify_boundary=False,
            )
            yield top, left, [(v, p, s) for (v, p), s in zip(found, simplified, strict=True)]


def _polygons(part: np.ndarray, top: int, left: int) -> Iterator[tuple[int, shapely.Geometry]]:
    """Polygons of one block in scene pixel coordinates (exact integers: pieces meet edge to edge)."""
    valid = part != NODATA_LABEL
    if not valid.any():
        return
    offset = Affine.translation(left, top)
    for geometry, value in shapes(part, mask=valid, connectivity=4, transform=offset):
        yield int(value), shapely.geometry.shape(geometry)
