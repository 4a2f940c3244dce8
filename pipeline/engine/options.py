"""The engine's one options object, ``SegmentOptions``: every setting of a run, with its help and default.

The CLI's flags are generated from it (``pipeline.cli.flags``), the ``segment-scenes`` flow and its
deployments take it as their ``options`` parameter, and ``deeplab serve --options`` is validated against
it. A field marked ``runtime`` changes how a result is computed, not what it is: it is outside the
manifest's config hash, so changing it redoes nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.metadata import TTA, CRFParams, Fuse, InputScales
from pipeline.engine.backends import backend_names

_RUNTIME = "runtime"
_NEUTRAL = "neutral"
WHOLE_GPU = 1.0  # the GPU share a model actor requests unless told otherwise


def runtime_field(default: Any, **kwargs: Any) -> Any:
    """A field outside the result key: the same inputs give the same masks whatever its value."""
    return Field(default, json_schema_extra={_RUNTIME: True}, **kwargs)


def added_field(default: Any, neutral: Any, **kwargs: Any) -> Any:
    """A field added after results were keyed: left out of the config hash while unset or ``neutral`` (what
    every run did before the field existed), so the manifests written before it keep their keys."""
    return Field(default, json_schema_extra={_NEUTRAL: neutral}, **kwargs)


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tile: int | None = Field(
        None, ge=16, description="core size in pixels (default: the checkpoint's tiling, else 512)"
    )
    halo: int | None = Field(
        None,
        ge=0,
        description="context read around each core, pixels (default: the model's receptive field and 3 σα "
        "of the CRF, up to half the core for models with image pooling, else up to the core)",
    )
    cores_per_window: int | None = Field(
        None,
        ge=1,
        le=8,
        description="blocks of NxN cores share one window, so the halo is read and computed once per block "
        "(1: a window per core; larger: less halo work, more memory per window; default: the checkpoint's "
        "evaluated tiling, else 2)",
    )
    crf: bool | None = Field(
        None,
        description="refine each window with the dense CRF (default: as the checkpoint advises: on, unless "
        "its tune-crf found that the CRF did not help on held-out images)",
    )
    crf_backend: Literal["pydensecrf", "torch"] | None = added_field(
        None,
        neutral="pydensecrf",
        description="the dense CRF's implementation: pydensecrf (C++, CPU) or torch (a permutohedral "
        "lattice in torch, CPU or GPU; its labels agree with pydensecrf's on at least 995 pixels in 1000) "
        "(default: torch with --crf-device gpu, else pydensecrf)",
    )
    crf_device: Literal["cpu", "gpu"] = runtime_field(
        "cpu",
        description="where the CRF runs: cpu (CRF actors beside the model actors) or gpu (inside each model "
        "actor right after inference, on its device, so probabilities never leave it; torch backend)",
    )
    crf_params: CRFParams | None = Field(
        None,
        description='the CRF\'s parameters as JSON, e.g. \'{"w1": 5, "sigma_alpha": 80}\' '
        "(default: the checkpoint's tuned ones, else the paper's)",
    )
    scales: tuple[float, ...] | None = Field(
        None, description="multi-scale inputs, e.g. 0.75 1 (default: the checkpoint's, else 1 alone)"
    )
    fuse: Fuse | None = Field(None, description="how scales are fused (default: the checkpoint's, else max)")
    tta: TTA | None = Field(
        None,
        description="test-time views averaged per window: 2, 4 or 8 model passes "
        "(default: the checkpoint's, else none)",
    )
    batch_size: int = runtime_field(4, ge=1, description="windows per model call")
    runtime: Literal["eager", "compile", "onnxruntime"] | None = runtime_field(
        None,
        description="the model's forward pass: eager torch, torch.compile, or ONNX Runtime's CPU provider on "
        "an export made once per checkpoint; the labels are the same up to float rounding (default: "
        "onnxruntime where the model runs on the CPU and its architecture was measured at least 1.3x faster "
        "that way (the Lite0 models), else eager; --context scene runs eager)",
    )
    onnx_cache: str | None = runtime_field(
        None,
        description="the folder ONNX exports are kept in, one file per checkpoint sha256 (default: "
        "DEEPLAB_ONNX_CACHE, else --out/.work/.onnx); share one between output folders to export once",
    )
    device: str = runtime_field("auto", description="auto, cpu, cuda, cuda:1 ...")
    allow_ungeoreferenced: bool = Field(False, description="segment scenes without a CRS or transform")
    engine: str = runtime_field(
        "ray",
        description="the compute backend: ray (a local cluster started by itself, or --ray-address), local "
        "(this process), or another installed one (pipeline/engine/backends.py)",
    )
    ray_address: str | None = runtime_field(
        None, description="join this Ray cluster (default: RAY_ADDRESS, else start a local one)"
    )
    max_in_flight: int | None = runtime_field(
        None,
        ge=1,
        description="windows queued on actors at once (default: twice what the cluster's actors hold)",
    )
    gpus_per_model_actor: float = runtime_field(
        WHOLE_GPU, gt=0, le=1, description="GPU share each inference actor requests (0.5: two actors per GPU)"
    )
    keep_warm_s: float = runtime_field(
        0.0,
        ge=0,
        description="on a running cluster (--ray-address): leave the model and CRF actors up, loaded, "
        "until idle this many seconds, for the next run of the same model and options (0: stop them)",
    )
    max_pixels: int | None = runtime_field(
        None,
        ge=1,
        description="refuse, in preflight, any scene with more pixels than this on its staged grid (a cap on "
        "what a nightly run accepts: a sparse file can claim any size)",
    )
    wait: bool = runtime_field(
        True,
        description="when another run is writing into --out, wait for it to finish (--no-wait: refuse at "
        "once, exit code 3)",
    )
    assets: tuple[str, ...] | None = runtime_field(
        None,
        description="STAC inputs: the assets to stack as the model's bands, in its band order (default: by "
        "the bands' common names, else a visual asset)",
    )
    scratch: str | None = runtime_field(
        None,
        description="with --out in a bucket: the local folder its files are built in before upload, kept for "
        "resuming (default: DEEPLAB_SCRATCH, else <temp>/deeplab-scratch/<hash of --out>)",
    )
    allow_remote_sources: bool = runtime_field(
        False,
        description="let a local VRT given as a scene read remote sources (URLs, /vsicurl/, /vsis3/ ...): "
        "refused without it, before any request",
    )
    replace: bool = runtime_field(
        False,
        description="replace the outputs of a scene id that another source or another checkpoint published "
        "in --out (refused without it: a scene's folder is never replaced in silence)",
    )
    verify_inputs: bool = runtime_field(
        False,
        description="identify every input by a sha256 of its whole content: local files whatever their size "
        "and mtime say, remote objects by reading every byte (default: the cached sha256 of a local file, "
        "a remote object's ETag and size)",
    )
    amp: bool = Field(True, description="mixed precision on CUDA")
    match_resolution: bool = Field(False, description="resample scenes to the model's training pixel size")
    force_resolution: bool = runtime_field(
        False,
        description="segment scenes whose pixel size is more than 8x from the model's (refused otherwise: "
        "the model does not see such objects at the scale it learnt them)",
    )
    mpp: float | None = Field(None, gt=0, description="a slide's level-0 µm/px when its file does not say")
    probabilities: bool = Field(
        False, description="also write the top-class confidence (probabilities.tif / .ome.tif)"
    )
    vectorize: bool = Field(
        False, description="also write polygons (polygons.gpkg; slides: polygons.geojson for QuPath)"
    )
    min_area_m2: float | None = added_field(
        None,
        neutral=None,
        ge=0,
        description="scenes' polygons: regions smaller than this (m²) are merged into their largest "
        "neighbour (default: 16 pixels, a 4x4 cell of the decoder's stride-4 grid)",
    )
    min_area_um2: float | None = added_field(
        None,
        neutral=None,
        ge=0,
        description="slides' polygons: regions smaller than this (µm²) are merged into their largest "
        "neighbour (default: 16 pixels at the working µm/px)",
    )
    polygons_background: bool = added_field(
        False,
        neutral=False,
        description="also draw polygons of the classes the checkpoint marks as background",
    )
    ome_zarr: bool = Field(
        False,
        description="slides: also write the image at the working µm/px with the mask as its label image, "
        "as OME-Zarr (NGFF 0.5; napari with napari-ome-zarr opens it)",
    )
    context: Literal["window", "scene"] = Field(
        "window",
        description="DeepLab-v3 image pooling: over each window, or once over the whole scene (one more "
        "model pass; tiles then agree where they meet)",
    )

    @field_validator("engine")
    @classmethod
    def _an_installed_backend(cls, engine: str) -> str:
        if engine not in backend_names():
            raise ValueError(f"no compute backend named {engine!r}; installed: {', '.join(backend_names())}")
        return engine

    @field_validator("scales")
    @classmethod
    def _scales_a_model_can_take(cls, scales: tuple[float, ...] | None) -> tuple[float, ...] | None:
        """The checkpoint's own rule for scales (0.1-4, distinct), checked on the flag before any scene."""
        return None if scales is None else InputScales(scales=scales).scales

    @model_validator(mode="after")
    def _crf_runs_where_its_backend_can(self) -> SegmentOptions:
        if self.crf_device == "gpu" and self.crf_backend == "pydensecrf":
            raise ValueError("--crf-device gpu needs --crf-backend torch: pydensecrf runs on the CPU only")
        return self

    @model_validator(mode="after")
    def _onnxruntime_where_it_runs(self) -> SegmentOptions:
        if self.runtime == "onnxruntime" and self.device.startswith("cuda"):
            raise ValueError("--runtime onnxruntime runs on the CPU: use --device cpu (or auto) with it")
        if self.runtime == "onnxruntime" and self.context == "scene":
            raise ValueError(
                "--context scene needs --runtime eager: the scene's pooled features are set on the torch "
                "model's image pooling"
            )
        return self


def neutral_value(name: str) -> Any:
    """The value of an ``added_field`` that every earlier run had; None for the other fields."""
    extra = SegmentOptions.model_fields[name].json_schema_extra
    return extra.get(_NEUTRAL) if isinstance(extra, dict) else None


def is_added(name: str) -> bool:
    """Whether the option ``name`` is an ``added_field`` (left out of the config hash while neutral)."""
    extra = SegmentOptions.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and _NEUTRAL in extra


def is_runtime(name: str) -> bool:
    """Whether the option ``name`` is outside the result key (marked on its field)."""
    extra = SegmentOptions.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(_RUNTIME))


RUNTIME_ONLY_OPTIONS = frozenset(name for name in SegmentOptions.model_fields if is_runtime(name))
