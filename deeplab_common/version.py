"""The installed software version, recorded in checkpoints and outputs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    try:
        return f"deeplab-pipeline {version('deeplab-pipeline')}"
    except PackageNotFoundError:  # running from a source tree without installing
        return "deeplab-pipeline (source)"
