"""`deeplab train`: SGD with the paper's poly schedule, seeded, resumable, CPU or CUDA+AMP."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console
from torch import nn

from deeplab_common.errors import ConfigError
from models.adapt import Adaptation, adapt_weights, adapted_bands
from models.checkpoint import file_sha256, load_checkpoint, read_metadata
from models.inference import pick_device
from models.metadata import BandInfo, CheckpointMetadata, ClassInfo, default_classes, with_roles
from models.registry import build_model, get_architecture
from models.train_loop import FileSink, Session, run_epochs
from models.training_images import (
    TrainingImage,
    band_statistics,
    first_pixel,
    median_frequency_weights,
    statistics_step,
    training_pixel_size,
)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    architecture: str = "deeplabv3plus_efficientnet_lite0"
    pretrained: Literal["none", "imagenet"] = "imagenet"
    output_stride: int | None = None
    classes: list[str]
    colors: list[tuple[int, int, int]] | None = None
    background_classes: list[str] = Field(default_factory=list, description="marked as background")
    object_classes: list[str] = Field(default_factory=list, description="marked as small objects")
    object_f1_classes: list[str] | None = Field(
        None, description="classes validated by object F1 (SpaceNet's); None: the small-object classes"
    )
    ignore_index: int = 255
    class_weights: list[float] | Literal["auto"] | None = None
    band_names: list[str] | None = None
    normalisation: Literal["auto", "dataset", "pretrained"] = "auto"
    crop_size: int = Field(256, ge=32)
    scale_range: tuple[float, float] = (0.75, 1.25)
    colour_jitter: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(30, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = True
    half: bool = True
    val_every: int = Field(1, ge=1)
    pixel_size_m: float | None = None
    init_from: str | None = Field(None, description="fine-tune from this checkpoint (same architecture)")

    @field_validator("scale_range")
    @classmethod
    def _ordered_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"scale range must be 0 < low <= high (got {value[0]} {value[1]})")
        return value


def start_session(
    config: TrainConfig,
    train_data: list[TrainingImage],
    val_data: list[TrainingImage],
    data_description: dict[str, Any],
    command: str,
    console: Console,
    device: torch.device | None = None,
) -> Session:
    """Check the settings, then build the model (from ImageNet, or adapted from ``init_from``), its
    optimiser and the checkpoint's metadata; ``device``: where this process trains (default: the
    config's)."""
    if not train_data:
        raise ConfigError("no training images left after the validation split")
    object_f1 = config.object_classes if config.object_f1_classes is None else config.object_f1_classes
    unknown = [name for name in object_f1 if name not in config.classes]
    if unknown:
        raise ConfigError(
            f"--object-f1: {unknown[0]!r} is not one of the classes ({', '.join(config.classes)})"
        )
    if config.colors is not None and len(config.colors) != len(config.classes):
        raise ConfigError(f"{len(config.colors)} colours given for {len(config.classes)} classes")
    try:  # the class roles are checked now, not after the training they are written at the end of
        with_roles(default_classes(config.classes), config.background_classes, config.object_classes)
    except ValueError as error:
        raise ConfigError(f"--background-classes/--object-classes: {error}") from None
    get_architecture(config.architecture)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = device or pick_device(config.device)
    num_classes = len(config.classes)
    sample = first_pixel(train_data[0])  # bands and dtype of the input
    num_bands = int(sample.shape[0])
    bands = _band_infos(config, train_data, num_bands)
    model = build_model(config.architecture, num_classes, num_bands, config.output_stride, config.pretrained)
    adaptation = Adaptation(())
    if config.init_from is not None:
        bands, adaptation = _initialise_from(model, Path(config.init_from), config, bands, console)
    model = model.to(device)
    input_dtype = str(sample.numpy().dtype)
    metadata = _metadata(config, bands, data_description, train_data, command, input_dtype)
    if adaptation.changed:
        metadata.training["initialised_from"]["adapted"] = list(adaptation.lines)
    return Session(
        config=config,
        train_data=train_data,
        val_data=val_data,
        model=model,
        optimizer=_optimizer(config, model),
        bands=bands,
        weights=_class_weights(config, train_data, num_classes),
        device=device,
        metadata=metadata,
        object_f1=list(object_f1),
    )


def train(
    config: TrainConfig,
    train_data: list[TrainingImage],
    val_data: list[TrainingImage],
    out: Path,
    data_description: dict[str, Any],
    console: Console | None = None,
    stop_after: int | None = None,
    command: str = "",
) -> CheckpointMetadata:
    """Train in this process and write ``out`` (checkpoint) after every epoch, with a resumable state file
    beside it. ``stop_after`` ends this run after that many epochs in total; running again resumes."""
    console = console or Console(stderr=True)
    session = start_session(config, train_data, val_data, data_description, command, console)
    return run_epochs(session, FileSink(out), console, stop_after)


def initialised_from(path: Path) -> dict[str, Any]:
    """What a fine-tuned model started from: its file, hash, and how that was trained."""
    source = read_metadata(path)
    history = source.metrics.get("history", [])
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "command": source.training.get("command"),
        "seed": source.training.get("seed"),
        "epochs": source.training.get("epochs_completed"),
        "minutes": round(sum(float(r.get("seconds", 0)) for r in history) / 60, 1),
        "initialised_from": source.training.get("initialised_from"),
    }


def _initialise_from(
    model: nn.Module, path: Path, config: TrainConfig, fresh_bands: list[BandInfo], console: Console
) -> tuple[list[BandInfo], Adaptation]:
    """Start from a checkpoint's weights, adapted where its classes or bands differ (said on the console)."""
    loaded = load_checkpoint(path)
    source = loaded.metadata
    if source.architecture != config.architecture:
        raise ConfigError(
            f"{path}: is a {source.architecture}; cannot initialise a {config.architecture} from it "
            "(--arch must match the checkpoint's)"
        )
    names = [band.name for band in fresh_bands]
    adaptation = adapt_weights(model, loaded.model, source, config.classes, names, config.output_stride)
    for line in adaptation.lines:
        console.print(f"--init-from {path.name}: {line}", highlight=False, soft_wrap=True)
    return adapted_bands(source, fresh_bands), adaptation


def _band_infos(config: TrainConfig, data: list[TrainingImage], num_bands: int) -> list[BandInfo]:
    names = config.band_names or (
        ["red", "green", "blue"] if num_bands == 3 else [f"band{i + 1}" for i in range(num_bands)]
    )
    if len(names) != num_bands:
        raise ConfigError(f"{len(names)} band names given for {num_bands}-band images")
    use_pretrained = config.normalisation == "pretrained" or (
        config.normalisation == "auto" and config.pretrained != "none" and num_bands == 3
    )
    if use_pretrained:
        means, stds = get_architecture(config.architecture).imagenet_normalisation
        mean_list, std_list = list(means), list(stds)
        while len(mean_list) < num_bands:  # extra bands (e.g. NIR) share the RGB mean statistics
            mean_list.append(float(np.mean(means)))
            std_list.append(float(np.mean(stds)))
        mean_list, std_list = mean_list[:num_bands], std_list[:num_bands]
    else:
        mean_list, std_list = band_statistics(data, statistics_step(data))
    return [BandInfo(name=n, mean=m, std=s) for n, m, s in zip(names, mean_list, std_list, strict=True)]


def _class_weights(config: TrainConfig, data: list[TrainingImage], num_classes: int) -> torch.Tensor:
    if config.class_weights is None:
        return torch.ones(num_classes)
    if config.class_weights == "auto":
        return torch.tensor(
            median_frequency_weights(data, num_classes, statistics_step(data)), dtype=torch.float32
        )
    if len(config.class_weights) != num_classes:
        raise ConfigError(f"{len(config.class_weights)} class weights given for {num_classes} classes")
    return torch.tensor(config.class_weights, dtype=torch.float32)


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _metadata(
    config: TrainConfig,
    bands: list[BandInfo],
    data_description: dict[str, Any],
    data: list[TrainingImage],
    command: str,
    input_dtype: str,
) -> CheckpointMetadata:
    coloured = (
        default_classes(config.classes)
        if config.colors is None
        else [ClassInfo(name=n, color=c) for n, c in zip(config.classes, config.colors, strict=True)]
    )
    classes = with_roles(coloured, config.background_classes, config.object_classes)
    pixel_size = config.pixel_size_m or training_pixel_size(data)
    return CheckpointMetadata(
        architecture=config.architecture,
        arch_args={
            "num_classes": len(config.classes),
            "in_channels": len(bands),
            "output_stride": config.output_stride
            or get_architecture(config.architecture).default_output_stride,
        },
        classes=classes,
        bands=bands,
        input_dtype=input_dtype,
        input_max=float(np.iinfo(input_dtype).max) if np.issubdtype(input_dtype, np.integer) else 1.0,
        pixel_size_m=pixel_size,
        ignore_index=config.ignore_index,
        training={
            "data": data_description,
            "command": command,
            "seed": config.seed,
            "config": config.model_dump(mode="json"),
            "initialised_from": initialised_from(Path(config.init_from)) if config.init_from else None,
        },
    )
