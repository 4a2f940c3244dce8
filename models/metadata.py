"""What a checkpoint says about itself: the typed metadata stored as JSON inside the .safetensors file."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMAT_NAME = "deeplab-pipeline/checkpoint"
FORMAT_VERSION = 1


# What a class is to the outputs: a class of areas (QuPath annotations), the background (no polygons unless
# asked, not tinted in quicklooks) or small objects such as nuclei (QuPath detections).
ClassRole = Literal["region", "background", "object"]


class ClassInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    color: tuple[int, int, int] = Field(description="RGB 0-255, used in colour tables and quicklooks")
    role: ClassRole = Field("region", description="region, background or object (small objects: detections)")

    @property
    def hex_color(self) -> str:
        """The colour as ``rrggbb`` (cards, the classes table, STAC's ``color_hint``)."""
        return "".join(f"{v:02x}" for v in self.color)


class BandInfo(BaseModel):
    """One input band and the statistics used to normalise it: ``(value - mean) / std``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    mean: float
    std: float

    @field_validator("std")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("std must be positive")
        return value


class CRFParams(BaseModel):
    """Fully connected CRF (Potts) parameters; defaults are the DeepLab paper's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    iterations: int = Field(10, ge=1, le=100)
    w1: float = Field(4.0, ge=0, description="appearance (bilateral) kernel weight")
    sigma_alpha: float = Field(121.0, gt=0, description="bilateral spatial std, pixels")
    sigma_beta: float = Field(5.0, gt=0, description="bilateral intensity std, in the 0-255 scale")
    w2: float = Field(3.0, ge=0, description="smoothness (Gaussian) kernel weight")
    sigma_gamma: float = Field(3.0, gt=0, description="smoothness spatial std, pixels")


class CRFVerdict(BaseModel):
    """Whether the tuned CRF helps on held-out images (``deeplab tune-crf``): the scores with and without it,
    and how sure the gain is (a paired bootstrap over the images). The engine runs the CRF only where the
    mIoU gain is clear of the noise between images: the lower end of its 95% interval above zero."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    miou_without: float
    miou_with: float
    boundary_f1_without: float
    boundary_f1_with: float
    miou_gain_interval: tuple[float, float] = Field(
        description="95% paired-bootstrap interval of the mIoU gain (with - without) over the images"
    )
    boundary_f1_gain_interval: tuple[float, float] = Field(description="the same for boundary F1")
    resamples: int = Field(ge=1, description="bootstrap resamples")
    images: int = Field(ge=1, description="held-out images the verdict was measured on")
    source: str = Field("", description="which images, e.g. the globs and the held-out share")

    @property
    def helps(self) -> bool:
        """The mIoU gain's interval lies above zero: a gain that images chosen otherwise would not undo."""
        return self.miou_gain_interval[0] > 0

    def describe(self) -> str:
        low, high = self.miou_gain_interval
        return (
            f"with the tuned CRF mIoU {self.miou_without:.3f} -> {self.miou_with:.3f} (gain 95% interval "
            f"{low:+.3f} to {high:+.3f}), boundary F1 {self.boundary_f1_without:.3f} -> "
            f"{self.boundary_f1_with:.3f} on {self.images} held-out images"
        )


class Tiling(BaseModel):
    """How the engine cuts scenes for this model unless told otherwise: the tiling its held-out evaluation
    was measured with (``deeplab evaluate --tile N --save-tiling``). Models with image pooling depend on
    the window they see; windows much larger than their training crops cost them accuracy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tile: int = Field(ge=16, description="core size, pixels")
    cores_per_window: int = Field(ge=1, le=8, description="blocks of NxN cores share one window")

    def describe(self) -> str:
        return f"{self.tile} px cores in blocks of {self.cores_per_window}²"


Fuse = Literal["max", "mean"]
FUSE_CHOICES: tuple[str, ...] = get_args(Fuse)


class InputScales(BaseModel):
    """Multi-scale inputs (the DeepLab papers' MSC): each window also runs resized by each scale, and the
    logits, brought back to the window's size, are fused per pixel (max, the paper's, or mean)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scales: tuple[float, ...] = Field((1.0,), min_length=1)
    fuse: Fuse = "max"

    @field_validator("scales")
    @classmethod
    def _sensible(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.1 <= s <= 4.0 for s in scales):
            raise ValueError(f"scales must lie in 0.1-4 (got {', '.join(f'{s:g}' for s in scales)})")
        if len(set(scales)) != len(scales):
            raise ValueError("scales must differ")
        return scales

    @property
    def single(self) -> bool:
        return self.scales == (1.0,)

    def describe(self) -> str:
        listed = ", ".join(f"{s:g}" for s in self.scales)
        return "each window at its own scale" if self.single else f"scales {listed} fused by {self.fuse}"


# Test-time augmentation: the views of each window whose logits are averaged (models.inference.TTA_VIEWS):
# none; a horizontal flip (2); both flips (4); flips and transposes, the dihedral group (8).
TTA = Literal["none", "hflip", "flips", "d4"]
TTA_CHOICES: tuple[str, ...] = get_args(TTA)
TTA_PHRASES: dict[str, str] = {
    "none": "each window as it is",
    "hflip": "each window and its horizontal flip (2 views)",
    "flips": "each window flipped both ways (4 views)",
    "d4": "each window's 8 flips and transposes",
}


# The keyword arguments of models.registry.build_model a checkpoint may carry, and their bounds: class ids are
# published as uint8 with 255 kept for nodata, and no imagery the engine stages has more bands than this.
ARCH_ARG_NAMES = frozenset({"num_classes", "in_channels", "output_stride", "pretrained"})
MAX_CLASSES = 255
MAX_BANDS = 64


def _count(args: dict[str, Any], name: str, default: int | None, most: int) -> None:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be a whole number from 1 to {most}, not {value!r}")


class CheckpointMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    architecture: str
    arch_args: dict[str, Any] = Field(description="keyword arguments of models.registry.build_model")
    classes: list[ClassInfo]
    bands: list[BandInfo]
    input_dtype: str = Field("uint8", description="dtype of the imagery it was trained on")
    input_max: float = Field(255.0, description="value of full scale in the training imagery")
    pixel_size_m: float | None = Field(None, description="ground sample distance it was trained at")
    ignore_index: int | None = 255
    crf: CRFParams = Field(default_factory=CRFParams)
    crf_tuning: dict[str, Any] | None = None
    crf_verdict: CRFVerdict | None = Field(
        None, description="whether the tuned CRF helped on held-out images (None: never measured; CRF on)"
    )
    tiling: Tiling | None = Field(None, description="the engine's default tiling for it (None: the engine's)")
    tiling_tuning: dict[str, Any] | None = None
    tta: TTA | None = Field(
        None, description="the test-time views the engine averages for it unless told otherwise (None: none)"
    )
    input_scales: InputScales | None = Field(
        None, description="the multi-scale inputs the engine runs it at unless told otherwise (None: 1 only)"
    )
    training: dict[str, Any] = Field(default_factory=dict, description="data, command, seed, epochs ...")
    metrics: dict[str, Any] = Field(default_factory=dict)
    software_version: str = ""
    weights_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("arch_args")
    @classmethod
    def _build_model_arguments(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Only build_model's arguments, within bounds: a checkpoint is a user's file, and its arguments
        size the model that is built before its weights are read."""
        unknown = sorted(set(args) - ARCH_ARG_NAMES)
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; build_model takes {sorted(ARCH_ARG_NAMES)}")
        _count(args, "num_classes", None, MAX_CLASSES)
        _count(args, "in_channels", 3, MAX_BANDS)
        if args.get("output_stride") not in (None, 8, 16):
            raise ValueError(f"output_stride must be 8 or 16, not {args['output_stride']!r}")
        return args

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def crf_advice(self) -> tuple[bool, str]:
        """Whether to run the CRF unless told, and why (the report and the model card say it)."""
        if self.crf_verdict is None:
            return True, "on by default (the checkpoint records no held-out verdict on the CRF)"
        if self.crf_verdict.helps:
            return True, f"on as the checkpoint advises: {self.crf_verdict.describe()}"
        return False, f"off as the checkpoint advises: {self.crf_verdict.describe()}"

    def views(self, asked: str | None = None) -> str:
        """The test-time views to run: those asked for, else the stored ones, else none."""
        return asked or self.tta or "none"

    def multiscale(self, scales: tuple[float, ...] | None = None, fuse: Fuse | None = None) -> InputScales:
        """The input scales to run: those asked for, else the stored ones, else 1 alone; so the fusion."""
        stored = self.input_scales or InputScales()
        return InputScales(scales=scales or stored.scales, fuse=fuse or stored.fuse)


DEFAULT_PALETTE: tuple[tuple[int, int, int], ...] = (
    (60, 16, 152),
    (132, 41, 246),
    (110, 193, 228),
    (254, 221, 58),
    (226, 169, 41),
    (155, 155, 155),
    (31, 119, 180),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
)


def with_roles(classes: list[ClassInfo], background: list[str], objects: list[str]) -> list[ClassInfo]:
    """``classes`` with the named ones marked as background or objects and the rest as regions."""
    names = [c.name for c in classes]
    unknown = sorted((set(background) | set(objects)) - set(names))
    if unknown:
        raise ValueError(f"no class named {', '.join(unknown)}; the classes are {', '.join(names)}")
    both = sorted(set(background) & set(objects))
    if both:
        raise ValueError(f"{', '.join(both)}: a class is background or objects, not both")
    role = {name: "background" for name in background} | {name: "object" for name in objects}
    return [c.model_copy(update={"role": role.get(c.name, "region")}) for c in classes]


def default_classes(names: list[str]) -> list[ClassInfo]:
    return [
        ClassInfo(name=name, color=DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)]) for i, name in enumerate(names)
    ]
