"""Scene readers: each kind of source is one class behind one interface — what the scene is (``describe``),
its blocks and where they hold data on a grid (``open_blocks``), how a plan names it, and its publisher.

GeoTIFFs (anything GDAL reads, URLs included) and whole-slide images are the two readers here; a new input
format (OME-TIFF, a zarr store) is one more class in ``READERS``, not a branch in the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import ClassVar

from affine import Affine

from deeplab_common.errors import UnreadableScene
from models.metadata import CheckpointMetadata
from pipeline.io.publishers import GeoTiffPublisher, Publisher, SlidePublisher
from pipeline.io.resolution import GridCheck, GridRules, check_raster, check_slide
from pipeline.io.slides import SlideBlocks, describe_slide, is_slide, open_slide
from pipeline.io.sources import (
    BlockReader,
    RasterBlocks,
    Scene,
    Source,
    as_source,
    local_file_problem,
    open_raster,
    sample_bits,
)
from pipeline.io.stac_input import STAC_ITEM_TAG


class SceneReader(ABC):
    """One kind of source."""

    format: ClassVar[str]  # the Scene's ``format``: how a described scene finds its reader again
    publisher: ClassVar[Publisher]
    nothing_valid: ClassVar[str]  # what a scene without one valid pixel lacks, for its report

    @classmethod
    @abstractmethod
    def accepts(cls, source: Source) -> bool: ...

    @abstractmethod
    def describe(self, source: Source, mpp: float | None = None) -> Scene:
        """What the scene is, from its header: no pixels are read."""

    @abstractmethod
    def open_blocks(self, scene: Scene, scale: float) -> AbstractContextManager[BlockReader]:
        """Blocks and valid masks of the scene on the grid ``scale`` times its own."""

    @abstractmethod
    def where(self, scene: Scene) -> str:
        """How a plan says where the scene lies (CRS and pixel size; a slide's levels and µm/px)."""

    @abstractmethod
    def check(self, scene: Scene, metadata: CheckpointMetadata, rules: GridRules) -> GridCheck:
        """The grid the scene is segmented on for ``metadata``'s model, and what refuses the scene."""


class GeoTiffReader(SceneReader):
    """A georeferenced raster through rasterio/GDAL: local files and URLs GDAL reads."""

    format = "geotiff"
    publisher = GeoTiffPublisher()
    nothing_valid = "no valid pixel"

    @classmethod
    def accepts(cls, source: Source) -> bool:
        return True  # the fallback: GDAL says whether it can read it (the preflight names the file if not)

    def describe(self, source: Source, mpp: float | None = None) -> Scene:
        with open_raster(source) as dataset:
            alpha = [c.name == "alpha" for c in dataset.colorinterp]
            flags = dataset.mask_flag_enums[0] if dataset.count else []
            return Scene(
                path=as_source(source),
                height=dataset.height,
                width=dataset.width,
                bands=dataset.count - sum(alpha),
                dtype=dataset.dtypes[0],
                crs=dataset.crs,
                transform=dataset.transform,
                nodata=dataset.nodata,
                has_mask=any(alpha) or any(flag.name == "per_dataset" for flag in flags),
                bits=sample_bits(dataset),
                format=self.format,
                derived_from=dataset.tags().get(STAC_ITEM_TAG),
            )

    @contextmanager
    def open_blocks(self, scene: Scene, scale: float) -> Iterator[BlockReader]:
        with open_raster(scene.path) as dataset:
            yield RasterBlocks(dataset, scale)

    def check(self, scene: Scene, metadata: CheckpointMetadata, rules: GridRules) -> GridCheck:
        return check_raster(scene, metadata, rules)

    def where(self, scene: Scene) -> str:
        size = scene.pixel_size_m()
        pixel = f"{size:.3g} m" if size else "unknown"
        return f"CRS {scene.crs.to_string() if scene.crs else 'none'}, pixel {pixel}"


class SlideReader(SceneReader):
    """A whole-slide image (SVS, NDPI, MRXS, ...) through tiffslide, OpenSlide as the fallback (local files);
    the tissue mask is its valid-data mask. A slide in a bucket is read in place by tiffslide."""

    format = "slide"
    publisher = SlidePublisher()
    nothing_valid = "no tissue found"

    @classmethod
    def accepts(cls, source: Source) -> bool:
        return is_slide(source)

    def describe(self, source: Source, mpp: float | None = None) -> Scene:
        info = describe_slide(source, mpp)
        width, height = info.level_dimensions[0]
        return Scene(
            path=as_source(source),
            height=height,
            width=width,
            bands=3,
            dtype="uint8",
            crs=None,  # slide pixels are not on the Earth
            transform=Affine.identity(),
            nodata=None,
            has_mask=True,  # the tissue mask
            bits=8,
            slide=info,
            format=self.format,
        )

    @contextmanager
    def open_blocks(self, scene: Scene, scale: float) -> Iterator[BlockReader]:
        assert scene.slide is not None, "described by this reader"
        with open_slide(scene.path) as slide:
            yield SlideBlocks(slide, scene.slide, scale)

    def check(self, scene: Scene, metadata: CheckpointMetadata, rules: GridRules) -> GridCheck:
        return check_slide(scene, metadata)  # always at the model's µm/px; no CRS to have

    def where(self, scene: Scene) -> str:
        assert scene.slide is not None, "described by this reader"
        mpp = f"{scene.slide.mpp:.3g} µm/px" if scene.slide.mpp else "no µm/px"
        return f"slide ({scene.slide.reader}), {scene.slide.levels} level(s), {mpp} at level 0"


READERS: tuple[SceneReader, ...] = (
    SlideReader(),
    GeoTiffReader(),
)  # the first that accepts a source reads it
_BY_FORMAT = {reader.format: reader for reader in READERS}


def reader_for(source: Source) -> SceneReader:
    """The reader of a source not yet described."""
    return next(reader for reader in READERS if reader.accepts(source))


def reader_of(scene: Scene) -> SceneReader:
    """The reader that described ``scene``."""
    return _BY_FORMAT[scene.format]


def describe(source: Source, mpp: float | None = None) -> Scene:
    """What a scene is; ``mpp`` overrides a slide's µm/px. A local path that cannot be a file of any kind is
    refused here, one plain line, before a reader tries it."""
    if isinstance(source, Path) and (problem := local_file_problem(source)):
        raise UnreadableScene(f"{source}: {problem}")
    return reader_for(source).describe(source, mpp)


def open_blocks(scene: Scene, scale: float) -> AbstractContextManager[BlockReader]:
    return reader_of(scene).open_blocks(scene, scale)
