"""`deeplab train`: SGD with the paper's poly schedule, seeded, resumable, CPU or CUDA+AMP."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from deeplab_common.atomic import atomic_output
from deeplab_common.errors import ConfigError, DataError
from models.augment import AugmentSettings, random_crop
from models.checkpoint import file_sha256, load_checkpoint, read_metadata, save_checkpoint
from models.data import Pair, pixel_size_m, read_pair
from models.inference import autocast_for, normalise, pick_device, predict_probabilities
from models.metadata import BandInfo, CheckpointMetadata, ClassInfo, default_classes, with_roles
from models.metrics import SegmentationMetrics
from models.registry import build_model, get_architecture


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    architecture: str = "deeplabv3plus_efficientnet_lite0"
    pretrained: Literal["none", "imagenet"] = "imagenet"
    output_stride: int | None = None
    classes: list[str]
    colors: list[tuple[int, int, int]] | None = None
    background_classes: list[str] = Field(default_factory=list, description="marked as background")
    object_classes: list[str] = Field(default_factory=list, description="marked as small objects")
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


@dataclass
class LoadedPair:
    pair: Pair
    image: torch.Tensor  # raw values, (bands, H, W)
    mask: torch.Tensor  # int64 (H, W)


def state_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".train-state.pt")


def load_pairs(pairs: list[Pair], num_classes: int, ignore_index: int) -> list[LoadedPair]:
    loaded = []
    bands: int | None = None
    for pair in pairs:
        image, mask = read_pair(pair, num_classes, ignore_index)
        if bands is not None and image.shape[0] != bands:
            raise DataError(f"{pair.image}: has {image.shape[0]} bands, the other images have {bands}")
        bands = image.shape[0]
        loaded.append(LoadedPair(pair, torch.from_numpy(image), torch.from_numpy(mask)))
    return loaded


def band_statistics(data: list[LoadedPair]) -> tuple[list[float], list[float]]:
    total = torch.zeros(data[0].image.shape[0], dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    for item in data:
        values = item.image.double().flatten(1)
        total += values.sum(1)
        squares += (values**2).sum(1)
        count += values.shape[1]
    mean = total / count
    std = torch.sqrt(torch.clamp(squares / count - mean**2, min=1e-6))
    return mean.tolist(), std.tolist()


def median_frequency_weights(data: list[LoadedPair], num_classes: int) -> list[float]:
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for item in data:
        valid = item.mask[(item.mask >= 0) & (item.mask < num_classes)]
        counts += torch.bincount(valid, minlength=num_classes).double()
    frequency = counts / counts.sum()
    present = frequency[frequency > 0]
    median = present.median() if present.numel() else torch.tensor(1.0)
    return [float(median / f) if f > 0 else 0.0 for f in frequency]


def epoch_samples(data: list[LoadedPair], crop: int, rng: np.random.Generator) -> list[int]:
    """One entry per crop: larger images give proportionally more crops per epoch."""
    entries = []
    for index, item in enumerate(data):
        height, width = item.mask.shape
        entries += [index] * max(1, round(height * width / (crop * crop)))
    return [int(i) for i in rng.permutation(entries)]


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total) / total) ** power


def evaluate_model(
    model: nn.Module, data: list[LoadedPair], bands: list[BandInfo], classes: list[str], ignore_index: int
) -> dict[str, Any]:
    metrics = SegmentationMetrics(classes, ignore_index)
    model.eval()
    for item in data:
        probabilities = predict_probabilities(model, normalise(item.image.numpy(), bands)[None])
        metrics.update(probabilities.argmax(1)[0].cpu().numpy(), item.mask.numpy())
    return metrics.summary()


def train(
    config: TrainConfig,
    train_pairs: list[Pair],
    val_pairs: list[Pair],
    out: Path,
    data_description: dict[str, Any],
    console: Console | None = None,
    stop_after: int | None = None,
    command: str = "",
) -> CheckpointMetadata:
    """Train and write ``out`` (checkpoint) after every epoch, with a resumable state file beside it.

    ``stop_after`` ends this run after that many epochs in total; running again resumes from there.
    """
    console = console or Console(stderr=True)
    if not train_pairs:
        raise ConfigError("no training pairs left after the validation split")
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
    device = pick_device(config.device)
    num_classes = len(config.classes)
    train_data = load_pairs(train_pairs, num_classes, config.ignore_index)
    val_data = load_pairs(val_pairs, num_classes, config.ignore_index)
    num_bands = train_data[0].image.shape[0]
    bands = _band_infos(config, train_data, num_bands)
    model = build_model(config.architecture, num_classes, num_bands, config.output_stride, config.pretrained)
    if config.init_from is not None:
        bands = _initialise_from(model, Path(config.init_from), config, num_bands)
    model = model.to(device)
    weights = _class_weights(config, train_data, num_classes)
    optimizer = _optimizer(config, model)
    start_epoch, history = 0, []
    state_path = state_path_for(out)
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["config"] != config.model_dump(mode="json"):
            raise ConfigError(
                f"{state_path}: a resumable run with other settings exists; delete it or use the same options"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        console.print(f"resuming {out} after epoch {start_epoch}/{config.epochs}")
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    settings = AugmentSettings(config.crop_size, config.scale_range, colour_jitter=config.colour_jitter)
    steps_per_epoch = math.ceil(
        len(epoch_samples(train_data, config.crop_size, np.random.default_rng(0))) / config.batch_size
    )
    total_steps = steps_per_epoch * config.epochs
    metadata = _metadata(config, bands, data_description, train_data, command)
    val_summary: dict[str, Any] = history[-1].get("val", {}) if history else {}
    with _progress(console) as progress:
        task = progress.add_task(
            "train",
            total=total_steps,
            completed=start_epoch * steps_per_epoch,
            loss=float("nan"),
            miou=val_summary.get("miou", float("nan")),
        )
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            rng = np.random.default_rng([config.seed, epoch])  # per-epoch streams make resume exact
            torch.manual_seed(config.seed * 100_003 + epoch)
            model.train()
            order = epoch_samples(train_data, config.crop_size, rng)
            losses = []
            for step_in_epoch in range(steps_per_epoch):
                step = epoch * steps_per_epoch + step_in_epoch
                for group in optimizer.param_groups:
                    group["lr"] = poly_lr(config.lr, step, total_steps, config.poly_power)
                chosen = order[step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size]
                if len(chosen) < 2:  # BatchNorm needs two samples; fold a lone leftover into the next epoch
                    progress.advance(task)
                    continue
                crops = [
                    random_crop(train_data[i].image, train_data[i].mask, settings, rng, config.ignore_index)
                    for i in chosen
                ]
                images = torch.stack([normalise(c[0].numpy(), bands) for c in crops]).to(device)
                masks = torch.stack([c[1] for c in crops]).to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast_for(device, config.amp):
                    logits = model(images)
                    loss = F.cross_entropy(
                        logits.float(), masks, weight=weights.to(device), ignore_index=config.ignore_index
                    )
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
                progress.update(task, advance=1, loss=float(np.mean(losses[-20:])))
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)) if losses else None,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if val_data and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
                val_summary = evaluate_model(model, val_data, bands, config.classes, config.ignore_index)
                record["val"] = val_summary
                progress.update(task, miou=val_summary["miou"])
            history.append(record)
            console.print(_epoch_line(record, config.epochs))
            metadata = metadata.model_copy(update={"metrics": {"val": val_summary, "history": history}})
            metadata.training["epochs_completed"] = epoch + 1
            save_checkpoint(out, model, metadata, half=config.half)
            _save_state(state_path, model, optimizer, epoch + 1, history, config)
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < config.epochs:
                console.print(f"stopping after epoch {epoch + 1}; run the same command again to resume")
                break
    return metadata


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  val mIoU {task.fields[miou]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    line = f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} ({record['seconds']:.0f} s)"
    if "val" in record:
        line += f", val mIoU {record['val']['miou']:.4f}, boundary F1 {record['val']['boundary_f1']:.4f}"
    return line


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, Any]],
    config: TrainConfig,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": config.model_dump(mode="json"),
    }
    with atomic_output(path) as temp:
        torch.save(state, temp)


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


def _initialise_from(model: nn.Module, path: Path, config: TrainConfig, num_bands: int) -> list[BandInfo]:
    """Start from a checkpoint's weights; a classifier of another class count is left freshly initialised."""
    loaded = load_checkpoint(path)
    source = loaded.metadata
    if source.architecture != config.architecture or source.num_bands != num_bands:
        raise ConfigError(
            f"{path}: is a {source.num_bands}-band {source.architecture}; cannot initialise a "
            f"{num_bands}-band {config.architecture} from it"
        )
    own = model.state_dict()
    fitting = {k: v for k, v in loaded.model.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return list(source.bands)  # the weights expect the normalisation they were trained with


def _band_infos(config: TrainConfig, data: list[LoadedPair], num_bands: int) -> list[BandInfo]:
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
        mean_list, std_list = band_statistics(data)
    return [BandInfo(name=n, mean=m, std=s) for n, m, s in zip(names, mean_list, std_list, strict=True)]


def _class_weights(config: TrainConfig, data: list[LoadedPair], num_classes: int) -> torch.Tensor:
    if config.class_weights is None:
        return torch.ones(num_classes)
    if config.class_weights == "auto":
        return torch.tensor(median_frequency_weights(data, num_classes), dtype=torch.float32)
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
    data: list[LoadedPair],
    command: str,
) -> CheckpointMetadata:
    coloured = (
        default_classes(config.classes)
        if config.colors is None
        else [ClassInfo(name=n, color=c) for n, c in zip(config.classes, config.colors, strict=True)]
    )
    classes = with_roles(coloured, config.background_classes, config.object_classes)
    sizes = [s for s in (pixel_size_m(item.pair.image) for item in data) if s is not None]
    pixel_size = config.pixel_size_m or (float(np.median(sizes)) if sizes else None)
    first_dtype = str(data[0].image.numpy().dtype)
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
        input_dtype=first_dtype,
        input_max=float(np.iinfo(first_dtype).max) if np.issubdtype(first_dtype, np.integer) else 1.0,
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
