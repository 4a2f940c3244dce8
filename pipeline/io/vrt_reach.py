"""What a local VRT given as a scene may reach, checked before GDAL opens it.

A VRT is a recipe that GDAL follows wherever it points: a raw band reads any file's bytes as pixels
(``/etc/passwd`` published as a mask), a source may be a URL (a request from the machine running the batch),
an inline VRT or a Python pixel function. GDAL 3.10 (rasterio's wheel) has no switch for raw bands (GDAL
3.12 adds ``GDAL_VRT_ENABLE_RAWRASTERBAND``), so the engine reads the recipe itself. A VRT given as a scene
may read local raster files, VRTs that obey the same rule, and archives of them (``/vsizip/``); remote
sources only when the run allows them (``--allow-remote-sources``). A VRT in object storage is fetched and
read the same way; it may read remote sources (the run was given a remote scene) but no local file of the
machine that reads it. The VRTs the engine writes for STAC Items are its own, and read remote assets by
design.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

from deeplab_common.errors import DeepLabError
from pipeline.io import objects
from pipeline.io.sources import Source, is_remote, object_url, sources_of_vrt

MAX_NESTING = 8  # VRTs of VRTs: deeper is refused (and a loop ends here)
LOCAL_ARCHIVES = ("/vsizip/", "/vsigzip/", "/vsitar/", "/vsi7z/")  # GDAL paths into local archives
NETWORK = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs")


def vrt_problem(vrt: Source, allow_remote: bool = False, depth: int = 0) -> str | None:
    """Why the VRT ``vrt`` (a path, or an object URL) may not be read (None when it may), naming the
    element or source at fault."""
    if depth > MAX_NESTING:
        return f"VRTs nested over {MAX_NESTING} deep (or in a loop) at {vrt}"
    remote = is_remote(vrt)
    try:
        if remote and object_url(vrt) is None:
            return f"reads {vrt}, a VRT inside a GDAL virtual path that cannot be checked: refused"
        root = ElementTree.fromstring(objects.get_bytes(str(vrt)) if remote else Path(vrt).read_bytes())
    except DeepLabError as error:
        return f"cannot read the VRT {vrt} ({error})"
    except (OSError, ElementTree.ParseError) as error:
        return f"not a readable VRT ({error})"
    for band in root.iter("VRTRasterBand"):
        if band.get("subClass", "") == "VRTRawRasterBand":
            raw = (band.findtext("SourceFilename") or "").strip()
            return f"has a raw band reading {raw!r} as pixels: raw VRT bands are refused"
        if (band.findtext("PixelFunctionLanguage") or "").strip().lower() == "python":
            return "has a Python pixel function: code in a scene file is refused"
    for source in sources_of_vrt(root, vrt):
        if problem := _source_problem(source, allow_remote or remote, remote, depth):
            return problem
    return None


def _source_problem(source: Source, allow_remote: bool, in_remote_vrt: bool, depth: int) -> str | None:
    text = str(source)
    if text.lstrip().startswith("<"):
        return "has an inline VRT as a source: refused"
    if not is_remote(source):
        if in_remote_vrt:  # a file of whichever machine reads the scene
            return f"is a VRT in object storage that reads the local file {text}: refused"
        return vrt_problem(source, allow_remote, depth + 1) if text.lower().endswith(".vrt") else None
    if text.startswith(LOCAL_ARCHIVES) and not any(part in text for part in (*NETWORK, "://")):
        return (
            None if not in_remote_vrt else f"is a VRT in object storage that reads the local {text}: refused"
        )
    network = text.startswith(NETWORK) or "://" in text
    if network and allow_remote:
        return vrt_problem(source, allow_remote, depth + 1) if text.lower().endswith(".vrt") else None
    what = "a remote source" if network else "a GDAL virtual path"
    hint = " (pass --allow-remote-sources to allow it)" if network else ""
    return f"reads {what}, {text}: refused before any request{hint}"
