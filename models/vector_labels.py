"""Vector labels as users keep them: polygons read from any file GDAL reads (GeoPackage, GeoJSON, FlatGeobuf,
Shapefile) or from QuPath GeoJSON, checked feature by feature, repaired, mapped to the model's classes, and
rasterised on a grid.

Readers are classes behind one base (`LabelReader`): `OgrLabels` for GIS files (a CRS is required: the
polygons are reprojected to each scene's) and `QuPathLabels` for QuPath's exports (level-0 pixel coordinates,
``objectType`` and ``classification``). Every problem is one line naming the file and the feature.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyogrio
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.warp import transform as warp_coordinates

from deeplab_common.digest import file_sha256
from deeplab_common.errors import DataError

InvalidPolicy = Literal["repair", "skip", "fail"]
IGNORE = "ignore"  # --class-map VALUE=ignore: features of that value are left out
LEFT_OUT = -1
POLYGONAL = ("Polygon", "MultiPolygon")
# A file's features as read: (id, properties, geometry)
Features = list[tuple[str, dict[str, Any], "shapely.Geometry | None"]]


@dataclass(frozen=True)
class LabelRules:
    """How a label file's features become classes.

    ``file_class``: every feature is this class (one class per file). Else ``class_field`` names the attribute
    whose value is the class, through ``class_map`` (value -> class name) or, without a map, by its own name.
    """

    classes: tuple[str, ...]
    file_class: str | None = None
    class_field: str | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    invalid: InvalidPolicy = "repair"

    def class_of(self, path: Path, feature: str, value: object) -> int:
        """The class index of an attribute value; ``LEFT_OUT`` for a value mapped to ``ignore``."""
        name = self.class_map.get(str(value), str(value)) if self.class_map else str(value)
        if name == IGNORE and IGNORE not in self.classes:
            return LEFT_OUT
        if name not in self.classes:
            mapped = f" (mapped to {name!r})" if self.class_map and str(value) in self.class_map else ""
            raise DataError(
                f"{path}: feature {feature}: class value {value!r}{mapped} is not one of the model's classes "
                f"({', '.join(self.classes)}); map it with --class-map VALUE=CLASS"
            )
        return self.classes.index(name)


@dataclass(frozen=True)
class LabelSet:
    """One label file's polygons, each with its class index; ``crs`` None means pixel coordinates."""

    path: Path
    sha256: str
    crs: CRS | None
    geometries: tuple[shapely.Geometry, ...]
    class_ids: tuple[int, ...]
    feature_ids: tuple[str, ...]
    repaired: tuple[str, ...] = ()  # one line per repaired feature
    skipped: tuple[str, ...] = ()  # one line per feature left out (--invalid-labels skip)
    notes: tuple[str, ...] = ()  # other lines worth a user's eye (ellipse ROIs used as polygons)

    @property
    def count(self) -> int:
        return len(self.geometries)

    @property
    def lines(self) -> tuple[str, ...]:
        """What a user should read about this file: repairs, features left out, notes."""
        return (*self.repaired, *self.skipped, *self.notes)

    def in_crs(self, crs: CRS | None) -> LabelSet:
        """The same polygons in ``crs`` (pixel-coordinate labels stay as they are)."""
        if self.crs is None or crs is None or self.crs == crs:
            return self
        moved = shapely.transform(
            np.asarray(self.geometries, dtype=object), lambda xy: _reproject_xy(xy, self.crs, crs)
        )
        return replace(self, crs=crs, geometries=tuple(moved))

    def record(self, classes: tuple[str, ...]) -> dict[str, Any]:
        """What a checkpoint and its card keep of this source."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "features": self.count,
            "crs": self.crs.to_string() if self.crs else "pixels",
            "classes": dict(Counter(classes[c] for c in self.class_ids)),
            "repaired": len(self.repaired),
            "skipped": len(self.skipped),
        }


def _reproject_xy(xy: np.ndarray, source: CRS | None, target: CRS) -> np.ndarray:
    xs, ys = warp_coordinates(source, target, xy[:, 0], xy[:, 1])
    return np.column_stack([xs, ys])


class LabelReader(ABC):
    """One kind of label file."""

    kind: ClassVar[str]

    @classmethod
    @abstractmethod
    def accepts(cls, path: Path) -> bool: ...

    @abstractmethod
    def features(self, path: Path) -> tuple[CRS | None, Features]:
        """The file's CRS and its features: (id, properties, geometry)."""

    def read(self, path: Path, rules: LabelRules) -> LabelSet:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: label file does not exist")
        crs, features = self.features(path)
        if not features:
            raise DataError(f"{path}: holds no features; nothing to train on")
        geometries: list[shapely.Geometry] = []
        class_ids: list[int] = []
        ids: list[str] = []
        repaired: list[str] = []
        skipped: list[str] = []
        notes: list[str] = []
        for feature_id, properties, geometry in features:
            where = f"{path}: feature {feature_id}"
            geometry = self.polygon_of(path, feature_id, properties, geometry, notes)
            if not geometry.is_valid:
                reason = shapely.is_valid_reason(geometry)
                if rules.invalid == "fail":
                    raise DataError(
                        f"{where}: invalid polygon ({reason}); repair it, or pass --invalid-labels repair"
                    )
                if rules.invalid == "skip":
                    skipped.append(f"{where}: invalid polygon ({reason}), left out")
                    continue
                geometry = _polygonal_part(shapely.make_valid(geometry))
                repaired.append(f"{where}: invalid polygon ({reason}), repaired")
                if geometry.is_empty:
                    skipped.append(f"{where}: nothing left after repair, left out")
                    continue
            class_id = self.class_of(path, feature_id, properties, rules)
            if class_id == LEFT_OUT:
                skipped.append(f"{where}: its class is mapped to {IGNORE}, left out")
                continue
            class_ids.append(class_id)
            geometries.append(geometry)
            ids.append(feature_id)
        if not geometries:
            raise DataError(f"{path}: no usable polygon among its {len(features)} features")
        self.check_coordinates(path, crs, geometries)
        return LabelSet(
            path, file_sha256(path), crs, tuple(geometries), tuple(class_ids), tuple(ids),
            tuple(repaired), tuple(skipped), tuple(notes),
        )  # fmt: skip

    def polygon_of(
        self,
        path: Path,
        feature_id: str,
        properties: dict[str, Any],
        geometry: shapely.Geometry | None,
        notes: list[str],
    ) -> shapely.Geometry:
        if geometry is None or geometry.is_empty:
            raise DataError(f"{path}: feature {feature_id} has no geometry")
        if geometry.geom_type not in POLYGONAL:
            raise DataError(
                f"{path}: feature {feature_id} is a {geometry.geom_type}; labels must be polygons "
                "(buffer points or lines into the areas they stand for first)"
            )
        return geometry

    def class_of(self, path: Path, feature_id: str, properties: dict[str, Any], rules: LabelRules) -> int:
        if rules.file_class is not None:
            return rules.classes.index(rules.file_class)
        if rules.class_field is None:
            raise DataError(
                f"{path}: say which class its features are: --labels CLASS=FILE, or --class-field"
            )
        if rules.class_field not in properties:
            raise DataError(
                f"{path}: feature {feature_id} has no attribute {rules.class_field!r} "
                f"(it has: {', '.join(sorted(properties)) or 'none'})"
            )
        return rules.class_of(path, feature_id, properties[rules.class_field])

    def check_coordinates(self, path: Path, crs: CRS | None, geometries: list[shapely.Geometry]) -> None:
        if crs is None:
            raise DataError(
                f"{path}: declares no CRS; write it with one (e.g. EPSG:4326) so it can be placed"
            )
        left, bottom, right, top = shapely.total_bounds(np.asarray(geometries, dtype=object))
        if crs.is_geographic and not (-180.5 <= left <= right <= 360.5 and -90.5 <= bottom <= top <= 90.5):
            raise DataError(
                f"{path}: declares the geographic CRS {crs.to_string()} but its coordinates "
                f"({left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g}) are not degrees: a wrong CRS"
            )
        if not all(math.isfinite(v) for v in (left, bottom, right, top)):
            raise DataError(f"{path}: coordinates are not finite numbers")


def _polygonal_part(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygons of a repaired geometry (make_valid can leave lines and points beside them)."""
    if geometry.geom_type in POLYGONAL:
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type in POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


class OgrLabels(LabelReader):
    """Any vector file GDAL/OGR reads, through pyogrio; its layer's CRS is required."""

    kind = "ogr"

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return True

    def features(self, path: Path) -> tuple[CRS | None, Features]:
        try:
            meta, fids, wkb, columns = pyogrio.raw.read(path, return_fids=True)
        except Exception as error:  # pyogrio's errors name GDAL's reason
            raise DataError(f"{path}: not a readable vector file ({str(error).splitlines()[0]})") from None
        try:
            crs = CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
        except CRSError:
            raise DataError(f"{path}: its CRS {meta['crs']!r} is not one GDAL knows") from None
        names = list(meta["fields"])
        geometries = shapely.from_wkb(wkb)
        features = []
        for index, fid in enumerate(fids):
            properties = {name: _plain(columns[c][index]) for c, name in enumerate(names)}
            features.append((str(fid), properties, geometries[index]))
        return crs, features


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


class QuPathLabels(LabelReader):
    """QuPath's GeoJSON export: level-0 pixel coordinates, no CRS; ``objectType`` annotation or detection (or
    cell, read as its outline), the class in ``classification.name``."""

    kind = "qupath"
    OBJECT_TYPES = ("annotation", "detection", "cell", "tile")

    @classmethod
    def accepts(cls, path: Path) -> bool:
        if path.suffix.lower() not in (".geojson", ".json"):
            return False
        try:
            with open(path, "rb") as handle:
                head = handle.read(1 << 16).decode("utf-8", "replace")
        except OSError:
            return False
        return '"objectType"' in head or re.search(r'"classification"\s*:\s*\{', head) is not None

    def features(self, path: Path) -> tuple[CRS | None, Features]:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: not readable as JSON ({error})") from None
        items = document.get("features", [document]) if isinstance(document, dict) else document
        if not isinstance(items, list):
            raise DataError(f"{path}: neither a GeoJSON FeatureCollection nor a list of features")
        features = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path}: feature {index} is not a JSON object")
            properties = dict(item.get("properties") or {})
            feature_id = str(item.get("id") or properties.get("name") or index)
            raw = item.get("geometry")
            geometry = shapely.geometry.shape(raw) if raw else None
            if isinstance(raw, dict) and raw.get("isEllipse"):
                properties["isEllipse"] = True
            features.append((feature_id, properties, geometry))
        return None, features

    def polygon_of(
        self,
        path: Path,
        feature_id: str,
        properties: dict[str, Any],
        geometry: shapely.Geometry | None,
        notes: list[str],
    ) -> shapely.Geometry:
        kind = str(properties.get("objectType", "annotation"))
        if kind not in self.OBJECT_TYPES:
            raise DataError(
                f"{path}: feature {feature_id}: objectType {kind!r} is not an annotation or a detection"
            )
        polygon = super().polygon_of(path, feature_id, properties, geometry, notes)
        if properties.get("isEllipse"):
            vertices = len(shapely.get_coordinates(polygon))
            if vertices < 16:
                raise DataError(
                    f"{path}: feature {feature_id} is an ellipse ROI written as {vertices} vertices, too few "
                    "to stand for it; export it from QuPath as a polygon (Objects > Convert to polygon)"
                )
            notes.append(
                f"{path}: feature {feature_id}: an ellipse ROI, used as its {vertices}-vertex polygon"
            )
        return polygon

    def class_of(self, path: Path, feature_id: str, properties: dict[str, Any], rules: LabelRules) -> int:
        if rules.file_class is not None or rules.class_field is not None:
            return super().class_of(path, feature_id, properties, rules)
        classification = properties.get("classification")
        name = classification.get("name") if isinstance(classification, dict) else classification
        if not name:
            raise DataError(f"{path}: feature {feature_id} has no classification; classify it in QuPath")
        return rules.class_of(path, feature_id, name)

    def check_coordinates(self, path: Path, crs: CRS | None, geometries: list[shapely.Geometry]) -> None:
        left, bottom, _, _ = shapely.total_bounds(np.asarray(geometries, dtype=object))
        if left < -1 or bottom < -1:
            raise DataError(f"{path}: negative pixel coordinates; QuPath writes level-0 pixels from 0")


READERS: tuple[type[LabelReader], ...] = (QuPathLabels, OgrLabels)


def read_labels(path: str | Path, rules: LabelRules) -> LabelSet:
    """The first reader that accepts the file reads it."""
    path = Path(path)
    reader = next(kind for kind in READERS if kind.accepts(path))
    return reader().read(path, rules)


def rasterise_labels(
    labels: LabelSet,
    transform: Affine,
    shape: tuple[int, int],
    aoi: shapely.Geometry | None,
    background: int,
    priority: tuple[int, ...],
    ignore_index: int,
) -> np.ndarray:
    """The class mask of a window: ``ignore_index`` outside the area of interest, ``background`` inside it
    where no polygon lies, each polygon's class where it does; where polygons overlap, the class earlier in
    ``priority`` wins. ``labels`` are in the grid's coordinates (CRS or pixels)."""
    height, width = shape
    window_box = shapely.box(*_window_bounds(transform, width, height))
    rank = {class_id: len(priority) - i for i, class_id in enumerate(priority)}
    hits = [i for i, g in enumerate(labels.geometries) if g.intersects(window_box)]
    hits.sort(key=lambda i: rank.get(labels.class_ids[i], 0))  # the highest priority is painted last
    painted = np.full(shape, background, dtype=np.uint8)
    if hits:
        shapes = [(labels.geometries[i], labels.class_ids[i]) for i in hits]
        painted = rasterize(shapes, out_shape=shape, transform=transform, fill=background, dtype="uint8")
    if aoi is None:
        return painted.astype(np.int64)
    inside = np.zeros(shape, dtype=np.uint8)
    if aoi.intersects(window_box):
        inside = rasterize([(aoi, 1)], out_shape=shape, transform=transform, fill=0, dtype="uint8")
    return np.where(inside == 1, painted, ignore_index).astype(np.int64)


def _window_bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    xs, ys = zip(
        *(transform @ corner for corner in ((0, 0), (width, 0), (0, height), (width, height))), strict=True
    )
    return min(xs), min(ys), max(xs), max(ys)


def default_aoi(labels: list[LabelSet], buffer: float) -> shapely.Geometry:
    """Where labels exist, buffered: pixels farther than ``buffer`` from every label are not background."""
    everything = [g for label in labels for g in label.geometries]
    return shapely.union_all([shapely.buffer(g, buffer) for g in everything])


def read_aoi(path: str | Path, crs: CRS | None) -> shapely.Geometry:
    """A polygon file's union, in ``crs``."""
    area = OgrLabels().read(Path(path), LabelRules(classes=("aoi",), file_class="aoi")).in_crs(crs)
    return shapely.union_all(np.asarray(area.geometries, dtype=object))
