"""Sources and the one Scene type that describes them; rasters through rasterio/GDAL, blocks on a grid.

A scene is a local path or a URL read in place (``s3://``, ``gs://``, ``az://``, ``http(s)://``, or GDAL's
``/vsis3/``-style paths: ``pipeline.io.objects``); URLs stay strings throughout, since ``Path`` would fold
their ``//``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.windows import Window

from deeplab_common.digest import file_sha256
from deeplab_common.errors import DataError, UnreadableScene
from models.data import ground_pixel_size
from pipeline.io import objects
from pipeline.io.slides import SlideInfo

Source = Path | str  # a local path, or a URL / GDAL virtual path (see is_remote)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_remote(source: Source) -> bool:
    """A URL (``scheme://``, ``file://`` included) or a GDAL ``/vsi...`` path: not opened as a local file."""
    return isinstance(source, str) and (bool(_URL.match(source)) or source.startswith("/vsi"))


def as_source(text: str | Path) -> Source:
    """Local paths become ``Path``; URLs stay as given."""
    return text if isinstance(text, str) and is_remote(text) else Path(text)


def source_id(source: Source) -> str:
    """The scene's id: its file name without the suffix (``s3://b/x/scene.tif`` -> ``scene``)."""
    if is_remote(source):
        return PurePosixPath(urlparse(str(source)).path).stem
    return Path(source).stem


_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")
# a file name holds at most 255 bytes, and the engine's temporary names (``.partial-<id>``, ``<id>.log``,
# an atomic write's random suffix) add to a scene's id: ids are kept well under it
MAX_ID_BYTES = 200


def scene_id_problem(source: Source) -> str | None:
    """Why the scene's id cannot name its output folder under ``--out`` (None when it can): an empty id, ``.``
    or ``..`` (``...tif``, ``..tif``: the outputs would land beside or above ``--out``), a path separator or
    a control character."""
    name = source_id(source)
    if not name:
        return "has an empty scene id (its file name without the suffix): rename it"
    if name in {".", ".."}:
        return f"has the scene id {name!r}, which would write outside the output folder: rename it"
    if _UNSAFE_ID.search(name):
        return f"has the scene id {name!r}, with a path separator or control character: rename it"
    if (size := len(name.encode())) > MAX_ID_BYTES:
        return (
            f"has a scene id of {size} bytes, longer than the {MAX_ID_BYTES} its output folder's names can "
            "hold: rename it"
        )
    return None


def object_url(source: Source) -> objects.ObjectUrl | None:
    """The object a remote source names (None for a local path, or a GDAL path such as ``/vsizip/``)."""
    return objects.object_url(str(source)) if is_remote(source) else None


def source_sha256(source: Source) -> str:
    """The sha256 of the scene's whole content (a remote object is streamed: every byte is read)."""
    if not is_remote(source):
        return file_sha256(Path(source))
    if object_url(source) is None:
        raise UnreadableScene(
            f"{source}: only files and object URLs (s3://, gs://, az://, https://, /vsis3/...) can be "
            "identified; copy it out of the archive"
        )
    return objects.sha256(str(source))


def content_identity(sha256: str) -> str:
    return f"sha256:{sha256}"


def source_identity(source: Source, verify: bool = False) -> str:
    """What a result of the scene is keyed by: a local file's content hash; a remote object's ETag (or
    version id) and size, from one HEAD request, so a nightly run over unchanged objects reads none of
    them; the content hash of either when ``verify``."""
    if verify or not is_remote(source) or object_url(source) is None:
        return content_identity(source_sha256(source))
    return objects.head(str(source)).identity


def vrt_sources(path: Path) -> list[Source]:
    """The files a local VRT reads, as sources (``sources_of_vrt``)."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise UnreadableScene(f"{path}: not a readable VRT ({error})") from None
    return sources_of_vrt(root, path)


def sources_of_vrt(root: Any, location: Source) -> list[Source]:
    """The files the VRT parsed as ``root`` reads (its ``SourceFilename`` elements, and a warped VRT's
    ``SourceDataset``): paths relative to the VRT resolved against ``location``'s folder (a remote VRT's
    prefix), GDAL and object paths as written."""
    found: dict[Source, None] = {}
    for element in (*root.iter("SourceFilename"), *root.iter("SourceDataset")):
        name = (element.text or "").strip()
        source = as_source(name)
        if isinstance(source, Path) and element.get("relativeToVRT") == "1":
            if is_remote(location):
                source = posixpath.join(posixpath.dirname(str(location)), name)
            else:
                source = Path(location).parent / source
        found[source] = None
    return list(found)


SOURCE_CHECKSUMS_TAG = "DEEPLAB_SOURCE_CHECKSUMS"  # in a scene VRT: its sources' STAC file:checksum, by path


def vrt_declared_checksums(path: Path) -> dict[str, str]:
    """The checksums a VRT declares for its sources (``file:checksum`` multihashes of the STAC assets it was
    made from, by the source's path as written): they identify those sources without a request."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    for item in root.iter("MDI"):
        if item.get("key") == SOURCE_CHECKSUMS_TAG:
            try:
                declared = json.loads(item.text or "{}")
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in declared.items()} if isinstance(declared, dict) else {}
    return {}


def combined_identity(own: str, parts: list[str]) -> str:
    """One identity for a file made of others (a VRT): its own content and each part's identity."""
    digest = hashlib.sha256("\n".join([own, *parts]).encode()).hexdigest()
    return f"sha256+sources:{digest}"


@dataclass(frozen=True, kw_only=True)
class Scene:
    path: Source
    height: int
    width: int
    bands: int
    dtype: str
    crs: CRS | None
    transform: Affine
    nodata: float | None
    has_mask: bool  # alpha band or internal/external mask
    bits: int | None = None  # significant bits per sample (GDAL NBITS), None for floats
    slide: SlideInfo | None = None  # a whole-slide image: the grid is level 0, µm/px in here
    format: str = "geotiff"  # the reader that described it (``pipeline.io.readers``)
    derived_from: str | None = None  # the STAC Item a scene VRT was made from (``stac_input``)

    @property
    def full_scale(self) -> float | None:
        """Largest value the samples can hold: from NBITS when set, else the dtype; None for floats."""
        return float(2**self.bits - 1) if self.bits else None

    @property
    def scene_id(self) -> str:
        return source_id(self.path)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and not self.transform.is_identity

    def pixel_size_m(self) -> float | None:
        """Ground sample distance in metres; geographic CRSs are converted at the scene's centre latitude.

        For a slide, its level-0 µm/px in metres (None when the file does not say and no --mpp was given).
        """
        if self.slide is not None:
            return self.slide.mpp * 1e-6 if self.slide.mpp else None
        if not self.georeferenced:
            return None
        return ground_pixel_size(self.crs, self.transform, self.height, self.width)


# GDAL's block cache defaults to 5% of RAM and fills up over a large scene; a fixed cache keeps the
# driver's memory independent of the scene's size (reads and writes are streamed block by block anyway).
GDAL_CACHE_MB = 256
# GDAL's own switches against hostile VRTs, for the GDALs that have them (raw bands: 3.12 on); the engine
# checks a scene VRT's recipe itself as well (pipeline.io.vrt_reach), whatever the GDAL
VRT_HARDENING = {"GDAL_VRT_ENABLE_RAWRASTERBAND": "NO", "GDAL_VRT_ENABLE_PYTHON": "NO"}


def gdal_env(source: Source | None = None) -> rasterio.Env:
    """GDAL's settings for reading ``source``: a fixed block cache; the credentials, retries and timeouts
    of ``objects.gdal_options`` (a local VRT may read remote objects); and, for a remote scene or a VRT,
    no folder listing on open (a bucket listing per file opened is slow and needless)."""
    listing = source is not None and (is_remote(source) or Path(str(source)).suffix.lower() == ".vrt")
    no_listing = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"} if listing else {}
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, **objects.gdal_options(), **no_listing, **VRT_HARDENING)


def gdal_path(source: Source) -> Source:
    """The path GDAL opens: an object URL as GDAL's ``/vsis3/``-style path; anything else as given."""
    url = object_url(source)
    return url.gdal_path if url is not None else source


def local_file_problem(path: Path) -> str | None:
    """Why a local scene path cannot be a raster file at all (None when it can be): what GDAL would
    otherwise report as an unreadable file, said plainly."""
    try:
        info = path.stat()
    except RuntimeError:
        return "is a symbolic link loop"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if error.errno == errno.ENOENT:
            return "scene does not exist"
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a folder, not a raster file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    return None


@contextmanager
def open_raster(path: Source) -> Iterator[DatasetReader]:
    path = as_source(path)
    if isinstance(path, Path) and (problem := local_file_problem(path)):
        raise UnreadableScene(f"{path}: {problem}")
    if object_url(path) is not None:
        objects.head(str(path))  # no credentials, access denied, no such object: said plainly, before GDAL
    with gdal_env(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dataset = rasterio.open(gdal_path(path))
        except RasterioIOError as exc:
            raise UnreadableScene(f"{path}: not a readable raster ({exc})") from None
        with dataset:
            yield dataset


def sample_bits(dataset: DatasetReader) -> int | None:
    dtype = np.dtype(dataset.dtypes[0])
    if not np.issubdtype(dtype, np.integer):
        return None
    declared = dataset.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")  # a band-level item in GDAL
    sign_bit = 1 if np.issubdtype(dtype, np.signedinteger) else 0
    return int(declared) if declared else dtype.itemsize * 8 - sign_bit


def read_block(
    dataset: DatasetReader, top: int, left: int, height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """Image bands only (an alpha band is mask, not data), on a grid ``scale`` times finer than the source.

    ``top, left, height, width`` are on that grid; with ``scale != 1`` GDAL resamples bilinearly.
    """
    indexes = [i + 1 for i, c in enumerate(dataset.colorinterp) if c.name != "alpha"] or None
    if scale == 1.0:
        return np.asarray(dataset.read(indexes=indexes, window=Window(left, top, width, height)))
    bands = len(indexes) if indexes else dataset.count
    return np.asarray(
        dataset.read(
            indexes=indexes,
            window=_source_window(top, left, height, width, scale),
            out_shape=(bands, height, width),
            resampling=Resampling.bilinear,
        )
    )


def read_valid(
    dataset: DatasetReader, top: int, left: int, height: int, width: int, scale: float = 1.0
) -> np.ndarray:
    """True where the source has data: nodata value, alpha band and internal masks all honoured."""
    if scale == 1.0:
        return np.asarray(dataset.dataset_mask(window=Window(left, top, width, height))) > 0
    window = _source_window(top, left, height, width, scale)
    return np.asarray(dataset.dataset_mask(window=window, out_shape=(height, width))) > 0


def _source_window(top: int, left: int, height: int, width: int, scale: float) -> Window:
    return Window(left / scale, top / scale, width / scale, height / scale)


def resampled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """The grid a scene is staged on when resampled by ``scale`` (staged pixels per source pixel)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


class BlockReader(Protocol):
    """Blocks of a scene on the grid it is staged on, and where they hold data."""

    def read_block(self, top: int, left: int, height: int, width: int) -> np.ndarray: ...

    def read_valid(self, top: int, left: int, height: int, width: int) -> np.ndarray: ...


class RasterBlocks:
    """A GeoTIFF's (or any GDAL raster's) blocks; a block GDAL cannot decode is the file's problem, said
    with the file and where (a truncated file passes the header checks and fails here)."""

    def __init__(self, dataset: DatasetReader, scale: float) -> None:
        self.dataset, self.scale = dataset, scale

    def read_block(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        try:
            return read_block(self.dataset, top, left, height, width, self.scale)
        except RasterioIOError as error:
            raise self._unreadable(top, left, error) from error

    def read_valid(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        try:
            return read_valid(self.dataset, top, left, height, width, self.scale)
        except RasterioIOError as error:
            raise self._unreadable(top, left, error) from error

    def _unreadable(self, top: int, left: int, error: Exception) -> DataError:
        # rasterio's "Read failed. See previous exception" wraps GDAL's own error: that one says the cause
        cause = error.__cause__ or error.__context__ or error
        said = str(cause).splitlines()[0] if str(cause) else str(error).splitlines()[0]
        if "does not exist" in said or "HTTP" in said:  # a source of a VRT that is missing or unreachable
            return DataError(f"{self.dataset.name}: a file it reads near row {top}, column {left}: {said}")
        return DataError(
            f"{self.dataset.name}: its pixels near row {top}, column {left} cannot be decoded: the file is "
            f"truncated or corrupt (GDAL: {said})"
        )
