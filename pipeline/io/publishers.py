"""Publishers: how a kind of scene's labels become files. GeoTIFF scenes publish COGs on their own grid;
slides publish OME-TIFF pyramids (and OME-Zarr) in slide coordinates at the working µm/px. Each reader names
its publisher, so a new output kind is one more class here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pystac
from affine import Affine

from models.metadata import ClassInfo
from pipeline.io.areas import row_pixel_areas_m2
from pipeline.io.cog import write_confidence_cog, write_mask_cog
from pipeline.io.ome import write_ome_pyramid, write_ome_zarr
from pipeline.io.regrid import NearestView
from pipeline.io.report import REPORT_NAME
from pipeline.io.slides import level_for_scale
from pipeline.io.sources import Scene
from pipeline.io.vectorize import GeoPackageWriter, PolygonWriter, QuPathWriter


@dataclass(frozen=True)
class Publication:
    """What one scene's publisher is given: the scene, the grid it was segmented on and what to write."""

    scene: Scene
    shape: tuple[int, int]  # the grid the model ran on
    scale: float  # that grid's pixels per source pixel
    classes: Sequence[ClassInfo]
    tags: dict[str, str]  # provenance, for formats that carry tags
    scratch: Path  # a folder of the scene's work area for intermediate levels
    image: Any  # the staged image (bands, H, W) on the grid the model ran on


class Publisher(ABC):
    """Writes one kind of scene's mask and confidence; says where its files go and what its polygons are."""

    files: ClassVar[dict[str, str]]  # output name -> file name in the scene's folder
    media_types: ClassVar[dict[str, str]]  # output name -> its media type (STAC assets, index.html)
    polygon_writer: ClassVar[type[PolygonWriter]]  # the polygons' format

    def outputs(self, target: Path, probabilities: bool, vectorize: bool, ome_zarr: bool) -> dict[str, Path]:
        wanted = {"mask", "quicklook", "report"}
        wanted |= {"probabilities"} if probabilities else set()
        wanted |= {"polygons"} if vectorize else set()
        wanted |= {"ome_zarr"} if ome_zarr and "ome_zarr" in self.files else set()
        return {name: target / file for name, file in self.files.items() if name in wanted}

    @abstractmethod
    def output_grid(self, array: Any, publication: Publication) -> Any:
        """``array`` on the model's grid as this format publishes it (a view; nothing is read)."""

    @abstractmethod
    def write_mask(self, labels: Any, publication: Publication, outputs: dict[str, Path]) -> None: ...

    @abstractmethod
    def write_confidence(self, confidence: Any, publication: Publication, out: Path) -> None: ...

    @abstractmethod
    def polygon_transform(self, publication: Publication) -> Affine:
        """Mask pixels -> the polygons' coordinates."""

    @abstractmethod
    def pixel_areas(self, publication: Publication) -> np.ndarray | None:
        """The area of one published mask pixel in each row, in the polygon writer's unit (None: unknown)."""

    @abstractmethod
    def report_section(
        self, publication: Publication, class_pixels: Sequence[int], skipped_share: float
    ) -> dict[str, Any]:
        """This format's fields of ``report.json`` (none for scenes; levels, mm² and the share of cores
        skipped as background for slides)."""


class GeoTiffPublisher(Publisher):
    """Cloud-Optimized GeoTIFFs on the source's CRS and transform; polygons in a GeoPackage."""

    files: ClassVar[dict[str, str]] = {
        "mask": "mask.tif",
        "probabilities": "probabilities.tif",
        "polygons": "polygons.gpkg",
        "quicklook": "quicklook.png",
        "report": REPORT_NAME,
    }
    media_types: ClassVar[dict[str, str]] = {
        "mask": pystac.MediaType.COG,
        "probabilities": pystac.MediaType.COG,
        "polygons": pystac.MediaType.GEOPACKAGE,
        "quicklook": pystac.MediaType.PNG,
        "report": pystac.MediaType.JSON,
    }
    polygon_writer = GeoPackageWriter

    def output_grid(self, array: Any, publication: Publication) -> Any:
        scene = publication.scene
        if publication.shape == (scene.height, scene.width):
            return array
        return NearestView(array, (scene.height, scene.width), publication.scale)

    def write_mask(self, labels: Any, publication: Publication, outputs: dict[str, Path]) -> None:
        write_mask_cog(labels, publication.scene, publication.classes, publication.tags, outputs["mask"])

    def write_confidence(self, confidence: Any, publication: Publication, out: Path) -> None:
        write_confidence_cog(
            self.output_grid(confidence, publication), publication.scene, publication.tags, out
        )

    def polygon_transform(self, publication: Publication) -> Affine:
        return publication.scene.transform

    def pixel_areas(self, publication: Publication) -> np.ndarray | None:
        scene = publication.scene
        return row_pixel_areas_m2(scene.crs, scene.transform, scene.height)

    def report_section(
        self, publication: Publication, class_pixels: Sequence[int], skipped_share: float
    ) -> dict[str, Any]:
        return {}


class SlidePublisher(Publisher):
    """Pyramidal OME-TIFF (and OME-Zarr) on the working grid in µm: level 0 of a slide may be 100k px wide,
    so the mask stays at the µm/px it was segmented at; polygons in QuPath's level-0 pixels."""

    files: ClassVar[dict[str, str]] = {
        "mask": "mask.ome.tif",
        "probabilities": "probabilities.ome.tif",
        "polygons": "polygons.geojson",
        "quicklook": "quicklook.png",
        "report": REPORT_NAME,
        "ome_zarr": "slide.ome.zarr",
    }
    media_types: ClassVar[dict[str, str]] = {
        "mask": "image/tiff; application=ome-tiff",
        "probabilities": "image/tiff; application=ome-tiff",
        "polygons": pystac.MediaType.GEOJSON,
        "quicklook": pystac.MediaType.PNG,
        "report": pystac.MediaType.JSON,
        "ome_zarr": pystac.MediaType.ZARR,
    }
    polygon_writer = QuPathWriter

    @staticmethod
    def working_mpp(publication: Publication) -> float:
        """µm per pixel of the grid the slide was segmented (and is published) on."""
        slide = publication.scene.slide
        assert slide is not None, "a slide publisher publishes slides"
        return slide.level_mpp(0) / publication.scale

    def output_grid(self, array: Any, publication: Publication) -> Any:
        return array

    def write_mask(self, labels: Any, publication: Publication, outputs: dict[str, Path]) -> None:
        mpp, name = self.working_mpp(publication), f"{publication.scene.scene_id} mask"
        write_ome_pyramid(labels, mpp, outputs["mask"], publication.scratch, name)
        if "ome_zarr" in outputs:
            write_ome_zarr(publication.image, labels, mpp, outputs["ome_zarr"], name, publication.classes)

    def write_confidence(self, confidence: Any, publication: Publication, out: Path) -> None:
        write_ome_pyramid(confidence, self.working_mpp(publication), out, publication.scratch, "confidence")

    def polygon_transform(self, publication: Publication) -> Affine:
        return Affine.scale(1 / publication.scale)

    def pixel_areas(self, publication: Publication) -> np.ndarray | None:
        return np.full(publication.shape[0], self.working_mpp(publication) ** 2)  # µm²

    def report_section(
        self, publication: Publication, class_pixels: Sequence[int], skipped_share: float
    ) -> dict[str, Any]:
        slide = publication.scene.slide
        assert slide is not None, "a slide publisher publishes slides"
        mpp = self.working_mpp(publication)
        mm2_per_px = (mpp * 1e-3) ** 2
        return {
            "slide": {
                "reader": slide.reader,
                "levels": [list(d) for d in slide.level_dimensions],
                "level_0_mpp": slide.level_mpp(0),
                "level_read": level_for_scale(slide, publication.scale)[0],
                "working_mpp": mpp,
                "level_0_px_per_mask_px": 1 / publication.scale,
            },
            "class_areas_mm2": {
                c.name: float(n * mm2_per_px) for c, n in zip(publication.classes, class_pixels, strict=True)
            },
            "tissue_area_mm2": float(sum(class_pixels) * mm2_per_px),
            "background_cores_share": skipped_share,
        }
