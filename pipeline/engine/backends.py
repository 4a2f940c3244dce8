"""Which compute backends are installed: the entry points of the group ``deeplab_pipeline.compute``, each
a name (what ``--engine`` takes) and a class. The engine loads the one a run asks for, by name only: it
imports no backend's module (Ray's among them) until that backend is chosen."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

GROUP = "deeplab_pipeline.compute"


@cache
def _registered() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=GROUP)}


def backend_names() -> list[str]:
    """The installed backends' names, sorted (``local`` and ``ray`` with deeplab-pipeline itself)."""
    return sorted(_registered())


def load_backend(name: str) -> object:
    """The class registered as ``name``; an unknown name is a ``LookupError`` naming those registered."""
    point = _registered().get(name)
    if point is None:
        known = ", ".join(backend_names()) or f"none: is deeplab-pipeline installed? ({GROUP})"
        raise LookupError(f"no compute backend named {name!r}; installed: {known}")
    return point.load()
