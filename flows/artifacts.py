"""A flow run's artifacts: the batch table (markdown) and each published scene's quicklook."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from pipeline.engine.manifest import SceneRecord

THUMBNAIL_PX = 320  # artifacts live in the Prefect database: a small picture, the full one is on disk


def batch_table(records: list[SceneRecord], areas: dict[str, dict[str, float] | None]) -> str:
    """Markdown: one row per scene (status, tiles, class areas, time, message)."""
    lines = [
        "| scene | status | tiles computed / nodata / resumed | class areas | seconds | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for record in records:
        tiles = record.tiles or {}
        tile_text = (
            f"{tiles.get('computed', 0)} / {tiles.get('skipped', 0)} / {tiles.get('resumed', 0)}"
            if tiles
            else "–"
        )
        seconds = f"{record.seconds:.1f}" if record.seconds is not None else "–"
        lines.append(
            f"| {record.scene_id} | {record.outcome} | {tile_text} | {_areas(areas.get(record.source))} "
            f"| {seconds} | {_cell(record.message)} |"
        )
    done = sum(r.outcome == "done" for r in records)
    skipped = sum(r.outcome == "skipped" for r in records)
    failed = sum(r.outcome == "failed" for r in records)
    lines += [
        "",
        f"{len(records)} scenes: {done} segmented, {skipped} unchanged and skipped, {failed} failed.",
    ]
    return "\n".join(lines)


def _areas(areas: dict[str, float] | None) -> str:
    """Areas given in m²: hectares for scenes, mm² for slides (all under a square metre)."""
    if not areas:
        return "–"
    if max(areas.values()) < 1.0:
        return ", ".join(f"{name} {value * 1e6:,.3f} mm²" for name, value in areas.items())
    return ", ".join(f"{name} {value / 1e4:,.2f} ha" for name, value in areas.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def thumbnail_data_url(picture: Path, size: int = THUMBNAIL_PX) -> str:
    """The picture shrunk to ``size`` px as a PNG data URL (an image artifact needs a URL)."""
    with Image.open(picture) as image:
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def artifact_key(text: str) -> str:
    """Artifact keys are lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-") or "scene"
