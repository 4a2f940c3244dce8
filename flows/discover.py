"""Which scenes a run covers: a folder, a glob, or a list of paths, in a stable order."""

from __future__ import annotations

import glob
from pathlib import Path

from models.errors import DataError

RASTER_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".jp2", ".img"})
_GLOB_CHARS = frozenset("*?[")


def discover_scenes(inputs: str | list[str], exclude: Path | None = None) -> list[Path]:
    """Expand ``inputs`` into scene paths.

    A folder contributes its raster files (by suffix, not recursive, hidden files left out); a glob its
    matches (``**`` recurses); a file itself, whatever its suffix, so that a listed file that is not a
    raster is reported by its preflight rather than silently dropped (so is a listed scene that is
    missing). ``exclude`` (the output folder) is never searched. A folder that does not exist is an error.
    """
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    found: list[Path] = []
    excluded = exclude.resolve() if exclude else None
    for entry in entries:
        if _GLOB_CHARS & set(entry):
            matches = [Path(p) for p in glob.glob(entry, recursive=True)]
            found += [p for p in matches if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES]
        elif (path := Path(entry)).is_dir():
            found += [
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in RASTER_SUFFIXES
            ]
        elif path.exists() or path.suffix.lower() in RASTER_SUFFIXES:
            found.append(path)  # a listed scene that is missing fails alone, in its preflight
        else:
            raise DataError(f"{entry}: no such file or folder")
    unique = {p.resolve(): None for p in found if not _inside(p, excluded)}
    return sorted(unique, key=str)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def duplicate_ids(scenes: list[Path]) -> dict[Path, str]:
    """Scenes whose id (file stem) another scene already has: their outputs would overwrite each other."""
    seen: dict[str, Path] = {}
    clashes: dict[Path, str] = {}
    for scene in scenes:
        if scene.stem in seen:
            clashes[scene] = (
                f"{scene}: same scene id {scene.stem!r} as {seen[scene.stem]}; rename one of them"
            )
        else:
            seen[scene.stem] = scene
    return clashes
