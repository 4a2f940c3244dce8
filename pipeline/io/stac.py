"""STAC for the outputs: a STAC 1.1 Item per published scene (``item.json``) and the output folder's
``catalog.json`` linking them, all with relative links so the folder can be copied to a bucket and browsed.

Items are built with pystac and rio-stac: the footprint (reprojected to WGS84, densified) comes from the
published mask through rio-stac; the projection (v2), classification (v2) and file extensions through pystac.
The raster extension v2 and the processing extension have no pystac class yet, so their few fields are set
under their published schemas. Slides are in pixel coordinates, not on the Earth: their Items carry no
geometry and state the µm per pixel instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from rio_stac.stac import get_dataset_geom

from deeplab_common.atomic import write_text_atomically
from deeplab_common.digest import file_sha256
from models.metadata import ClassInfo
from pipeline.io.labels import NODATA_LABEL

ITEM_NAME = "item.json"
CATALOG_NAME = "catalog.json"
RASTER_V2 = "https://stac-extensions.github.io/raster/v2.0.0/schema.json"
PROCESSING = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
# What each output is to a STAC client (the roles of STAC's best practices).
ROLES: dict[str, list[str]] = {
    "mask": ["data", "labels"],
    "ome_zarr": ["data", "labels"],
    "probabilities": ["data"],
    "polygons": ["data", "labels"],
    "quicklook": ["thumbnail", "overview"],
    "report": ["metadata"],
}
TITLES: dict[str, str] = {
    "mask": "class mask",
    "ome_zarr": "the image with the class mask as its label image (OME-Zarr)",
    "probabilities": "top-class probability",
    "polygons": "class polygons",
    "quicklook": "quicklook",
    "report": "run report",
}


@dataclass(frozen=True)
class ItemFacts:
    """What an Item says of one published scene, beyond its files."""

    scene_id: str
    classes: Sequence[ClassInfo]
    class_pixels: Sequence[int]
    pixel_size_m: float | None  # of the published mask; for slides, the working µm/px in metres
    microns_per_pixel: float | None  # slides only
    georeferenced: bool  # the mask has a CRS: the Item gets a footprint and the projection fields
    processing: Mapping[str, Any]  # deeplab:* fields: model, checkpoint, its sha256, CRF, input sha256
    software_version: str
    derived_from: str | None = None  # the STAC Item the scene was read from: linked as ``derived_from``


def multihash_sha256(path: Path) -> str:
    """``file:checksum``: the sha2-256 multihash (code 0x12, length 0x20) of the file, in hex."""
    return "1220" + file_sha256(path)


def scene_item(facts: ItemFacts, files: Mapping[str, Path], media_types: Mapping[str, str]) -> pystac.Item:
    """The Item of one scene whose outputs are ``files`` (output name -> path in the scene's folder)."""
    now = datetime.now(UTC)
    geometry: dict[str, Any] | None = None
    bbox: list[float] | None = None
    if facts.georeferenced:
        with rasterio.open(files["mask"]) as mask:
            footprint = get_dataset_geom(mask, densify_pts=21, precision=7)
            geometry, bbox = footprint["footprint"], footprint["bbox"]
            crs, shape, transform, bounds = mask.crs, [mask.height, mask.width], mask.transform, mask.bounds
    item = pystac.Item(
        id=facts.scene_id,
        geometry=geometry,
        bbox=bbox,
        datetime=now,
        properties={},
        stac_extensions=[RASTER_V2, PROCESSING],
    )
    if facts.georeferenced:
        ProjectionExtension.ext(item, add_if_missing=True).apply(
            code=crs.to_string() if crs.to_epsg() else None,
            wkt2=None if crs.to_epsg() else crs.to_wkt(),
            shape=shape,
            transform=list(transform)[:6],
            bbox=list(bounds),
        )
        if facts.pixel_size_m:
            item.common_metadata.gsd = facts.pixel_size_m
    if facts.microns_per_pixel is not None:
        item.properties["deeplab:microns_per_pixel"] = facts.microns_per_pixel
    item.properties |= {
        "processing:software": {"deeplab-pipeline": facts.software_version},
        "processing:datetime": now.isoformat().replace("+00:00", "Z"),
        "processing:lineage": _lineage(facts.processing),
        **{f"deeplab:{name}": value for name, value in facts.processing.items()},
    }
    for name, path in files.items():
        _add_asset(item, name, path, media_types[name], facts)
    item.add_link(pystac.Link(pystac.RelType.ROOT, f"../{CATALOG_NAME}", pystac.MediaType.JSON))
    item.add_link(pystac.Link(pystac.RelType.PARENT, f"../{CATALOG_NAME}", pystac.MediaType.JSON))
    if facts.derived_from:
        item.add_link(
            pystac.Link("derived_from", facts.derived_from, pystac.MediaType.GEOJSON, "source Item")
        )
    return item


def write_item(item: pystac.Item, path: Path) -> None:
    document = item.to_dict(include_self_link=False, transform_hrefs=False)
    write_text_atomically(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class SourceCollection:
    """The STAC Collection a run's Items came from: the output catalog is then a Collection too."""

    id: str
    description: str
    license: str = "other"
    title: str | None = None


def write_catalog(out_dir: Path, title: str, name: str, collection: SourceCollection | None = None) -> Path:
    """``catalog.json`` of the output folder (named ``name``): one item link per scene folder that holds an
    Item; rewritten whole (atomically) each time a scene publishes, so it never lists a scene that is gone.
    When the input was a Collection, a Collection of the outputs (``<its id>-deeplab``), its extent that of
    the Items (each Item's bbox and time are read)."""
    items = sorted(Path(out_dir).glob(f"*/{ITEM_NAME}"))
    description = f"{title}: DeepLab class masks, one Item per scene"
    catalog: pystac.Catalog
    if collection is None:
        catalog = pystac.Catalog(id=name or "deeplab-output", description=description, title=title)
    else:
        catalog = pystac.Collection(
            id=f"{collection.id}-deeplab",
            description=f"{description}, of the Collection {collection.id}: {collection.description}",
            extent=_extent(items),
            license=collection.license,
            title=f"{collection.title or collection.id}: {title}",
        )
    for item_path in items:
        target = f"./{item_path.parent.name}/{ITEM_NAME}"
        catalog.add_link(
            pystac.Link(pystac.RelType.ITEM, target, pystac.MediaType.JSON, item_path.parent.name)
        )
    catalog.add_link(pystac.Link(pystac.RelType.ROOT, f"./{CATALOG_NAME}", pystac.MediaType.JSON))
    document = catalog.to_dict(include_self_link=False, transform_hrefs=False)
    path = Path(out_dir) / CATALOG_NAME
    write_text_atomically(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return path


def _extent(items: list[Path]) -> pystac.Extent:
    """The Items' bounding box (WGS84) and time span; a slide's Items have neither."""
    boxes, times = [], []
    for path in items:
        document = json.loads(path.read_text())
        if document.get("bbox"):
            boxes.append(document["bbox"][:4])
        if moment := document.get("properties", {}).get("datetime"):
            times.append(datetime.fromisoformat(moment.replace("Z", "+00:00")))
    bbox = (
        [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        if boxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    interval: list[datetime | None] = [min(times), max(times)] if times else [None, None]
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval]))


def _add_asset(item: pystac.Item, name: str, path: Path, media_type: str, facts: ItemFacts) -> None:
    asset = pystac.Asset(f"./{path.name}", TITLES.get(name), media_type=media_type, roles=ROLES.get(name))
    item.add_asset(name, asset)  # first: an asset's extensions are declared on the Item that owns it
    if path.is_file():
        files = FileExtension.ext(asset, add_if_missing=True)
        files.checksum = multihash_sha256(path)
        files.size = path.stat().st_size
    if name in ("mask", "ome_zarr"):
        total = max(sum(facts.class_pixels), 1)
        classes = [
            Classification.create(
                value=value,
                name=_token(info.name),
                description=info.name,
                color_hint=info.hex_color.upper(),
                count=int(pixels),
                percentage=round(100 * pixels / total, 4),
            )
            for value, (info, pixels) in enumerate(zip(facts.classes, facts.class_pixels, strict=True))
        ]
        classes.append(Classification.create(value=NODATA_LABEL, name="nodata", nodata=True))
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    if name in ("mask", "probabilities"):
        band: dict[str, Any] = {"nodata": NODATA_LABEL, "data_type": "uint8"}
        if facts.pixel_size_m:
            band["raster:spatial_resolution"] = facts.pixel_size_m
        if name == "probabilities":
            band["raster:scale"] = 1 / 254
        asset.extra_fields["bands"] = [band]


def _token(name: str) -> str:
    """A class name as the classification extension's ``name`` (no spaces)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _lineage(processing: Mapping[str, Any]) -> str:
    crf = processing.get("crf")
    refined = "refined by the fully connected CRF" if crf else "without the CRF"
    return (
        f"Per-pixel classes from the DeepLab model {processing.get('model')} (checkpoint "
        f"{processing.get('checkpoint')}, sha256 {processing.get('checkpoint_sha256')}), {refined}, "
        "by deeplab-pipeline"
    )
