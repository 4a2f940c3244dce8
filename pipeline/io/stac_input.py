"""STAC as input: Items from a file or URL (an Item, an ItemCollection, a Catalog or Collection), or from a
STAC API search; each Item becomes one scene, named by its id.

The bands a checkpoint needs are chosen among an Item's assets by their common names (``eo:bands`` or
STAC 1.1 ``bands``: red, green, blue, nir...), or named with ``--assets``; a multi-band visual asset is taken
when its bands fit. The chosen assets are stacked, without copying a pixel, into a small VRT in the run's
work folder (``<item id>.vrt``) that GDAL reads the COGs through, range by range. The VRT records the
Item's own href, which the published Item links as ``derived_from``. pystac reads files and catalogs,
pystac-client searches APIs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pystac
from pydantic import BaseModel, ConfigDict, Field

from deeplab_common.atomic import write_text_atomically
from deeplab_common.errors import DataError, SceneError
from pipeline.io.sources import SOURCE_CHECKSUMS_TAG, Source, as_source, gdal_path, is_remote, open_raster
from pipeline.io.stac import SourceCollection

STAC_ITEM_TAG = "DEEPLAB_STAC_ITEM"  # in a scene VRT: the href of the Item it was made from
VISUAL = "visual"
_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float64": "Float64",
}
_COLOR = {"red": "Red", "green": "Green", "blue": "Blue"}
_DURATION = re.compile(r"^-?P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?$")


class StacSearch(BaseModel):
    """A STAC API search, the input of a nightly run (``deeplab segment --stac-api URL ...``)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="the STAC API's root URL")
    collections: list[str] | None = Field(None, description="collection ids to search")
    bbox: tuple[float, float, float, float] | None = Field(None, description="west, south, east, north")
    intersects: dict[str, Any] | None = Field(None, description="a GeoJSON geometry the Items must intersect")
    datetime: str | None = Field(
        None,
        description="an RFC 3339 instant or interval (2026-12-01/2026-12-02, ../2026-12-01), or a window "
        "back from now as an ISO 8601 duration (P1D, PT24H: the last day), which a nightly run re-evaluates",
    )
    query: dict[str, Any] | None = Field(None, description="the query extension's object")
    filter: dict[str, Any] | None = Field(None, description="a CQL2-JSON filter")
    max_items: int | None = Field(None, ge=1, description="stop after this many Items")

    def interval(self, now: dt.datetime | None = None) -> str | None:
        """``datetime`` with a relative window made absolute (``P1D`` -> the last 24 hours up to now)."""
        if self.datetime is None or not (match := _DURATION.match(self.datetime.strip())):
            return self.datetime
        days, hours, minutes = (int(group or 0) for group in match.groups())
        end = now or dt.datetime.now(dt.UTC)
        start = end - dt.timedelta(days=days, hours=hours, minutes=minutes)
        return f"{start.isoformat(timespec='seconds')}/{end.isoformat(timespec='seconds')}".replace(
            "+00:00", "Z"
        )

    def collection(self) -> SourceCollection | None:
        """The Collection searched, when the search names exactly one (the output is then a Collection)."""
        if not self.collections or len(self.collections) != 1:
            return None
        from pystac_client import Client

        try:
            found = Client.open(self.url).get_collection(self.collections[0])
        except Exception as error:
            said = " ".join(str(error).split())[:300]
            raise DataError(f"{self.url}: collection {self.collections[0]}: {said}") from None
        return source_collection(found) if isinstance(found, pystac.Collection) else None

    def items(self) -> Iterator[pystac.Item]:
        from pystac_client import Client
        from pystac_client.exceptions import APIError

        try:
            client = Client.open(self.url)
            search = client.search(
                collections=self.collections,
                bbox=self.bbox,
                intersects=self.intersects,
                datetime=self.interval(),
                query=self.query,
                filter=self.filter,
                max_items=self.max_items,
            )
            yield from search.items()
        except APIError as error:
            raise DataError(
                f"{self.url}: the STAC API search failed ({' '.join(str(error).split())[:300]})"
            ) from None


def is_stac_document(entry: str) -> bool:
    """A STAC file or URL given as an input: by its ``.json`` suffix."""
    return entry.split("?", 1)[0].lower().endswith(".json")


def read_items(entry: str) -> tuple[list[pystac.Item], SourceCollection | None]:
    """The Items of a STAC document: an Item, an ItemCollection, or every Item under a Catalog/Collection;
    and the Collection, when the document is one."""
    try:
        document = json.loads(_read_text(entry))
    except (OSError, ValueError) as error:
        raise DataError(f"{entry}: not a readable STAC document ({error})") from None
    kind = document.get("type")
    try:
        if kind == "Feature":
            return [pystac.Item.from_dict(document, href=entry)], None
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(document)), None
        if kind in ("Catalog", "Collection"):
            root = pystac.read_file(entry)
            assert isinstance(root, pystac.Catalog)
            of = source_collection(root) if isinstance(root, pystac.Collection) else None
            return list(root.get_items(recursive=True)), of
    except Exception as error:
        raise DataError(f"{entry}: not a valid STAC {kind} ({' '.join(str(error).split())[:300]})") from None
    raise DataError(f"{entry}: not a STAC Item, ItemCollection, Catalog or Collection (type {kind!r})")


def source_collection(collection: pystac.Collection) -> SourceCollection:
    return SourceCollection(
        id=collection.id,
        description=collection.description,
        license=collection.license or "other",
        title=collection.title,
    )


def _read_text(entry: str) -> str:
    if is_remote(entry):
        from pipeline.io import objects

        return objects.get_bytes(entry).decode()
    return Path(entry).read_text()


def item_href(item: pystac.Item) -> str | None:
    """Where the Item itself is published (its self link, else the href it was read from)."""
    return item.get_self_href()


def _common_names(asset: pystac.Asset) -> list[str]:
    """The asset's bands by common name (``eo:bands``, or STAC 1.1's ``bands`` with ``eo:common_name``)."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [
        str(band.get("common_name") or band.get("eo:common_name") or band.get("name") or "") for band in bands
    ]


def choose_assets(
    item: pystac.Item, bands: Sequence[str], named: Sequence[str] | None
) -> list[tuple[str, int]]:
    """The (asset key, band number) that give ``bands`` in order: ``named`` assets as given; else one
    single-band asset per common name; else a visual asset whose bands fit. One line says what is missing."""
    assets = item.assets
    if named:
        missing = [key for key in named if key not in assets]
        if missing:
            raise SceneError(f"{item.id}: no asset {', '.join(missing)} (it has {', '.join(sorted(assets))})")
        return [(key, 1) for key in named]
    by_name: dict[str, str] = {}
    for key, asset in assets.items():
        names = _common_names(asset)
        if len(names) == 1:
            by_name.setdefault(names[0].lower(), key)
        elif not names and key.lower() in bands:
            by_name.setdefault(key.lower(), key)  # an asset named after its band, without band metadata
    if all(band in by_name for band in bands):
        return [(by_name[band], 1) for band in bands]
    for key, asset in assets.items():
        names = [name.lower() for name in _common_names(asset)]
        if key == VISUAL or "visual" in (asset.roles or []):
            if names and all(band in names for band in bands):
                return [(key, names.index(band) + 1) for band in bands]
            if not names and list(bands) == ["red", "green", "blue"]:
                return [(key, 1), (key, 2), (key, 3)]  # a visual asset is RGB unless it says otherwise
    found = sorted(by_name)
    raise SceneError(
        f"{item.id}: no assets give the model's bands {', '.join(bands)} (bands found by common name: "
        f"{', '.join(found) or 'none'}; assets: {', '.join(sorted(assets))}); name them with --assets"
    )


def scene_vrt(item: pystac.Item, bands: Sequence[str], named: Sequence[str] | None, folder: Path) -> Path:
    """``folder/<item id>.vrt``: the chosen assets stacked on the grid of the finest, read in place."""
    if not item.id or item.id in {".", ".."} or any(c in item.id for c in "/\\") or not item.id.isprintable():
        raise SceneError(f"{item.id!r}: an Item id that cannot name a scene folder")
    chosen = choose_assets(item, bands, named)
    headers = {}
    for key, _ in chosen:
        href = item.assets[key].get_absolute_href() or item.assets[key].href
        if key not in headers:
            with open_raster(as_source(href)) as dataset:
                headers[key] = (
                    href,
                    dataset.profile,
                    dataset.bounds,
                    dataset.res,
                    dataset.crs,
                    dataset.nodata,
                )
    reference = min(headers.values(), key=lambda header: abs(header[3][0]))
    _, profile, bounds, res, crs, _ = reference
    for href, _, _, _, other_crs, _ in headers.values():
        if other_crs != crs:
            raise SceneError(
                f"{item.id}: asset {href} is in {other_crs}, the others in {crs}; cannot stack them"
            )
    transform = profile["transform"]
    lines = [
        f'<VRTDataset rasterXSize="{profile["width"]}" rasterYSize="{profile["height"]}">',
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt()) if crs else ""}</SRS>',
        "  <GeoTransform>"
        + ", ".join(
            repr(float(v))
            for v in (transform.c, transform.a, transform.b, transform.f, transform.d, transform.e)
        )
        + "</GeoTransform>",
        "  <Metadata>",
        f"    <MDI key={quoteattr(STAC_ITEM_TAG)}>{escape(item_href(item) or item.id)}</MDI>",
        *_declared_checksums(item, chosen),
        "  </Metadata>",
    ]
    for number, ((key, band), name) in enumerate(zip(chosen, bands, strict=True), start=1):
        href, source_profile, source_bounds, source_res, _, nodata = headers[key]
        gdal_type = _GDAL_TYPES.get(np.dtype(source_profile["dtype"]).name, "Float32")
        left = (source_bounds.left - bounds.left) / res[0]
        top = (bounds.top - source_bounds.top) / res[1]
        width = source_profile["width"] * source_res[0] / res[0]
        height = source_profile["height"] * source_res[1] / res[1]
        source = "ComplexSource" if nodata is not None else "SimpleSource"
        path_text = escape(str(gdal_path(as_source(href))))
        size = f'xSize="{source_profile["width"]}" ySize="{source_profile["height"]}"'
        lines += [
            f'  <VRTRasterBand dataType="{gdal_type}" band="{number}">',
            f"    <ColorInterp>{_COLOR.get(name, 'Undefined')}</ColorInterp>",
            *([f"    <NoDataValue>{nodata!r}</NoDataValue>"] if nodata is not None else []),
            f"    <{source}>",
            f'      <SourceFilename relativeToVRT="0">{path_text}</SourceFilename>',
            f"      <SourceBand>{band}</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" {size}/>',
            f'      <DstRect xOff="{left!r}" yOff="{top!r}" xSize="{width!r}" ySize="{height!r}"/>',
            *([f"      <NODATA>{nodata!r}</NODATA>"] if nodata is not None else []),
            f"    </{source}>",
            "  </VRTRasterBand>",
        ]
    lines.append("</VRTDataset>")
    path = folder / f"{item.id}.vrt"
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def _declared_checksums(item: pystac.Item, chosen: list[tuple[str, int]]) -> list[str]:
    """The metadata line with each chosen asset's ``file:checksum`` by its GDAL path, when it has one."""
    declared = {}
    for key, _ in chosen:
        asset = item.assets[key]
        if checksum := asset.extra_fields.get("file:checksum"):
            href = asset.get_absolute_href() or asset.href
            declared[str(gdal_path(as_source(href)))] = str(checksum)
    if not declared:
        return []
    return [
        f"    <MDI key={quoteattr(SOURCE_CHECKSUMS_TAG)}>{escape(json.dumps(declared, sort_keys=True))}</MDI>"
    ]


def scenes_of_items(
    items: Sequence[pystac.Item], bands: Sequence[str], named: Sequence[str] | None, folder: Path
) -> tuple[list[Source], dict[Source, str]]:
    """A VRT scene per Item, and the Items that cannot be one, by id, with their line."""
    scenes: list[Source] = []
    refused: dict[Source, str] = {}
    for item in items:
        try:
            scenes.append(scene_vrt(item, bands, named, folder))
        except (SceneError, DataError) as error:
            refused[item.id] = str(error)
    return scenes, refused
