"""A scene's report (``report.json``) as a typed model: what was run, what came out, how long it took.

The engine builds it, writes it as JSON and hands it back; the CLI, the flow and the benchmarks read its
fields rather than string keys. Sections that do not apply (a slide's, a cluster's, polygons) are left out
of the JSON, as they always were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from deeplab_common.atomic import write_text_atomically
from models.metadata import CRFParams

REPORT_NAME = "report.json"  # in every published scene's folder, renamed into place last


class TileCounts(BaseModel):
    """Cores of the scene's grid: all of them, and what this run did with each."""

    model_config = ConfigDict(extra="forbid")
    total: int
    computed: int
    skipped: int  # wholly nodata: never computed
    resumed: int  # recorded by an earlier run
    windows: int  # computed this run (a block of cores shares one)


class SlideSection(BaseModel):
    """Where a slide's mask comes from: its reader, its levels and the µm/px it was segmented at."""

    model_config = ConfigDict(extra="forbid")
    reader: str
    levels: list[list[int]]
    level_0_mpp: float | None
    level_read: int
    working_mpp: float
    level_0_px_per_mask_px: float


class SceneReport(BaseModel):
    """``report.json`` of one published scene."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    scene: str
    input_identity: str  # sha256:... of the content, or a remote object's etag:...;size:...
    shape: list[int]
    crs: str | None
    pixel_size_m: float | None
    tiles: TileCounts
    tile: int
    halo: int
    cores_per_window: int
    context: str
    model_grid: list[int]
    warnings: list[str]
    class_pixels: dict[str, int]
    class_areas_m2: dict[str, float] | None
    model: str
    checkpoint: str
    checkpoint_sha256: str
    crf: CRFParams | None
    crf_reason: str | None = None  # why the CRF ran or not: the options, else the checkpoint's verdict
    crf_backend: str | None = None  # set when the CRF ran
    crf_device: str | None = None  # cpu: CRF actors; gpu: inside the model actors, on their device
    runtime: str | None = None  # the model's runtime(s) this run (``--runtime``); unset when nothing ran
    scales: list[float]
    fuse: str
    tta: str
    seconds: dict[str, float]
    megapixels_per_second: float
    software_version: str
    slide: SlideSection | None = None
    class_areas_mm2: dict[str, float] | None = None
    tissue_area_mm2: float | None = None
    background_cores_share: float | None = None
    outputs: dict[str, str] = {}  # output name -> file name in the scene's folder
    peak_rss_mb: dict[str, float | list[float]] = {}
    cluster: dict[str, Any] | None = None
    polygons: dict[str, int] | None = None  # polygons per written class
    polygon_rules: dict[str, Any] | None = None  # minimum area, simplification, classes left out
    nonfinite_pixels: int | None = None  # set when NaN or infinite samples were staged as nodata

    @property
    def total_seconds(self) -> float:
        return self.seconds["total"]

    def areas_m2(self) -> dict[str, float] | None:
        """Class areas in m²: from the CRS for scenes, from µm/px for slides; None when neither is known."""
        if self.class_areas_mm2 is not None:
            return {name: area * 1e-6 for name, area in self.class_areas_mm2.items()}
        return self.class_areas_m2

    def to_json(self) -> str:
        # unset sections stay out; set values (None included) stay in, as the report always had them
        return self.model_dump_json(indent=2, exclude_unset=True)

    def write(self, path: Path) -> None:
        write_text_atomically(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> SceneReport:
        return cls.model_validate_json(Path(path).read_text())
