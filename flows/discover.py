"""Deprecated alias of ``pipeline.discover`` (discovery is the engine's: the one driver uses it)."""

from __future__ import annotations

import warnings

from pipeline.discover import RASTER_SUFFIXES, discover_scenes, duplicate_ids

warnings.warn(
    "flows.discover moved to pipeline.discover; this alias will be removed", DeprecationWarning, stacklevel=2
)

__all__ = ["RASTER_SUFFIXES", "discover_scenes", "duplicate_ids"]
