"""Which scenes a run covers: a folder, a glob, a URL, or a list of them, in a stable order."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from deeplab_common.errors import DataError
from pipeline.io.objects import is_listing, is_object_url, list_objects
from pipeline.io.slides import SLIDE_SUFFIXES
from pipeline.io.sources import Source, is_remote, scene_id_problem, source_id
from pipeline.io.stac import SourceCollection
from pipeline.io.stac_input import StacSearch, is_stac_document, read_items, scenes_of_items
from pipeline.io.vrt_reach import vrt_problem

RASTER_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".jp2", ".img"}) | SLIDE_SUFFIXES
SUFFIXES_SAID = ", ".join(sorted(RASTER_SUFFIXES))  # for the lines that find none
_GLOB_CHARS = frozenset("*?[")


def discover_scenes(inputs: str | list[str], exclude: Path | None = None) -> list[Source]:
    """Expand ``inputs`` into scene paths.

    A folder contributes its raster files (by suffix, not recursive, hidden files left out); a glob its
    matches (``**`` recurses); a file itself, whatever its suffix, so that a listed file that is not a
    raster is reported by its preflight rather than silently dropped (so is a listed scene that is
    missing). ``exclude`` (the output folder) is never searched by a folder or a glob; a file named in it
    explicitly is a scene like any other. A folder that does not exist is an error.
    An object URL is a scene as given; a prefix (``s3://bucket/incoming/``) contributes its raster objects
    as a folder does, and a glob (``s3://bucket/**/*.tif``) its matches; a listing that finds none is an
    error, since a bucket has no folders to tell a wrong prefix by.
    """
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    found: list[Path] = []
    named: list[Path] = []  # files listed by name: segmented wherever they lie
    remote: list[str] = []
    excluded = exclude.resolve() if exclude else None
    for entry in entries:
        if is_object_url(entry) and is_listing(entry):
            remote += _listed_rasters(entry)
        elif is_remote(entry):
            remote.append(entry)
        elif _GLOB_CHARS & set(entry):
            matches = [Path(p) for p in glob.glob(entry, recursive=True)]
            found += _some(entry, "the glob", [p for p in matches if p.is_file() and _is_raster(p)], excluded)
        elif (path := Path(entry)).is_dir():
            # named as a raster but not a file (a folder, a broken link, a link loop): listed, so that its
            # preflight says what it is instead of the run dropping it in silence
            listed = [p for p in path.iterdir() if not p.name.startswith(".") and _is_raster(p)]
            found += _some(entry, "the folder", listed, excluded)
        elif path.exists() or _is_raster(path):
            named.append(path)  # a listed scene that is missing fails alone, in its preflight
        else:
            raise DataError(f"{entry}: no such file or folder")
    unique: dict[Source, None] = {_absolute(p): None for p in found}
    unique |= {_absolute(p): None for p in named}
    unique |= dict.fromkeys(remote)
    return sorted(unique, key=str)


def _is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES


def _some(entry: str, what: str, paths: list[Path], excluded: Path | None) -> list[Path]:
    """The scenes a folder or glob names, outside the output folder; none is an error: a nightly run pointed
    at the wrong place must fail, not record a run of no scenes."""
    kept = [path for path in paths if not _inside(path, excluded)]
    if not kept:
        raise DataError(f"{entry}: {what} names no raster file (by suffix: {SUFFIXES_SAID})")
    return kept


@dataclass(frozen=True)
class Discovered:
    """A run's inputs: the scenes to run, those refused before any work with their line, and the STAC
    Collection they came from (when one was given, or searched alone)."""

    scenes: list[Source]
    refused: dict[Source, str]
    collection: SourceCollection | None = None


def discover_inputs(
    entries: Sequence[str | Path | StacSearch],
    exclude: Path | None,
    bands: Sequence[str],
    assets: Sequence[str] | None,
    stac_folder: Path,
    allow_remote: bool = False,
) -> Discovered:
    """Every input of a run: scenes as ``discover_scenes`` finds them, and STAC Items (from documents and
    API searches) as VRTs in ``stac_folder`` with the ``bands`` chosen; then the scenes refused before any
    work (an id unsafe or clashing, an Item without the bands, a VRT reaching what it may not), each with its
    line."""
    items: list[Any] = []
    plain: list[str] = []
    collection: SourceCollection | None = None
    for entry in entries:
        if isinstance(entry, StacSearch):
            items += entry.items()
            collection = collection or entry.collection()
        elif is_stac_document(str(entry)):
            found, of = read_items(str(entry))
            items += found
            collection = collection or of
        else:
            plain.append(str(entry))
    scenes = discover_scenes(plain, exclude=exclude) if plain else []
    # a VRT given as a scene may reach only what vrt_reach allows (the STAC Items' VRTs are the engine's own)
    unreachable: dict[Source, str] = {
        scene: f"{scene}: {problem}"
        for scene in scenes
        if str(scene).lower().endswith(".vrt") and (problem := vrt_problem(scene, allow_remote))
    }
    vrts, unusable = scenes_of_items(items, bands, assets, stac_folder)
    scenes += vrts
    refused: dict[Source, str] = {**unusable, **unreachable, **refused_scenes(scenes)}
    return Discovered([scene for scene in scenes if scene not in refused], refused, collection)


def _listed_rasters(listing: str) -> list[str]:
    """The raster objects of a remote prefix or glob (hidden names left out, as in a folder)."""
    found = [
        url
        for url in list_objects(listing)
        if PurePosixPath(url).suffix.lower() in RASTER_SUFFIXES
        and not PurePosixPath(url).name.startswith(".")
    ]
    if not found:
        raise DataError(f"{listing}: no raster objects (by suffix: {SUFFIXES_SAID})")
    return found


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and _absolute(path).is_relative_to(folder)


def duplicate_ids(scenes: list[Source]) -> dict[Source, str]:
    """Every scene whose id (file stem) another scene has too: their outputs would overwrite each other, so
    all of them are refused, each with the one line that names every scene of its clash."""
    by_id: dict[str, list[Source]] = {}
    for scene in scenes:
        by_id.setdefault(source_id(scene), []).append(scene)
    clashes: dict[Source, str] = {}
    for name, group in by_id.items():
        if len(group) > 1:
            listed = " and ".join(str(scene) for scene in group)
            line = (
                f"{listed}: same scene id {name!r}, so their outputs would overwrite each other; rename one"
            )
            clashes |= dict.fromkeys(group, line)
    return clashes


def refused_scenes(scenes: list[Source]) -> dict[Source, str]:
    """The scenes refused before any work, each with its line: ids that cannot name an output folder, then
    ids that clash."""
    unsafe = {scene: f"{scene}: {problem}" for scene in scenes if (problem := scene_id_problem(scene))}
    return unsafe | duplicate_ids([scene for scene in scenes if scene not in unsafe])


def _absolute(path: Path) -> Path:
    """``path`` with its links resolved; a link loop as it is (its preflight says so)."""
    if path.is_symlink() and not path.exists():
        return Path(os.path.abspath(path))  # a broken link: named as given, its preflight says where to
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a loop
        return Path(os.path.abspath(path))
