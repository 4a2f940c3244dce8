"""The epochs of one training process, the same on one machine and in each Ray Train worker: poly-schedule
SGD over augmented crops, validation, and where each epoch is kept behind one base (`EpochSink`): the
checkpoint and a state file beside it here, Ray Train's checkpoints on a cluster (`pipeline/ray/training.py`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from deeplab_common.atomic import atomic_output
from deeplab_common.errors import ConfigError
from models.augment import AugmentSettings, random_crop
from models.checkpoint import save_checkpoint
from models.inference import autocast_for, normalise, predict_probabilities
from models.metadata import BandInfo, CheckpointMetadata
from models.metrics import SegmentationMetrics
from models.object_metrics import ObjectTally
from models.training_images import TrainingImage


@dataclass
class Session:
    """What one process trains: its settings (a `TrainConfig`), data, model and optimiser."""

    config: Any  # models.train.TrainConfig
    train_data: list[TrainingImage]
    val_data: list[TrainingImage]
    model: nn.Module  # unwrapped: what is saved and validated
    optimizer: torch.optim.Optimizer
    bands: list[BandInfo]
    weights: torch.Tensor  # class weights of the loss
    device: torch.device
    metadata: CheckpointMetadata
    object_f1: list[str]


class EpochSink(ABC):
    """Where a run's epochs are kept and resumed from; ``rank`` of ``world`` processes train together."""

    rank = 0
    world = 1
    where = ""  # named in messages about a resumable run

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this process trains it (data-parallel across processes on a cluster)."""
        return model

    @abstractmethod
    def resume(self) -> dict[str, Any] | None:
        """The state saved after the last kept epoch (model, optimizer, epoch, history, config), if any."""

    @abstractmethod
    def keep(self, session: Session, epoch: int, history: list[dict[str, Any]]) -> None:
        """Keep the checkpoint and resumable state after ``epoch``."""


def training_state(session: Session, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": session.config.model_dump(mode="json"),
    }


def state_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".train-state.pt")


class FileSink(EpochSink):
    """One process: the checkpoint at ``out`` and a state file beside it, rewritten after every epoch."""

    def __init__(self, out: Path) -> None:
        self.out, self.state_path = out, state_path_for(out)
        self.where = str(self.state_path)

    def resume(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        return dict(torch.load(self.state_path, map_location="cpu", weights_only=True))

    def keep(self, session: Session, epoch: int, history: list[dict[str, Any]]) -> None:
        save_checkpoint(self.out, session.model, session.metadata, half=session.config.half)
        with atomic_output(self.state_path) as temp:
            torch.save(training_state(session, epoch, history), temp)


def epoch_samples(data: list[TrainingImage], crop: int, rng: np.random.Generator) -> list[int]:
    """One entry per crop: larger images give proportionally more crops per epoch."""
    entries = []
    for index, item in enumerate(data):
        height, width = item.shape
        entries += [index] * max(1, round(height * width / (crop * crop)))
    return [int(i) for i in rng.permutation(entries)]


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total) / total) ** power


def evaluate_model(
    model: nn.Module,
    data: list[TrainingImage],
    bands: list[BandInfo],
    classes: list[str],
    ignore_index: int,
    object_classes: list[str] | None = None,
) -> dict[str, Any]:
    """Per-class IoU, mIoU, boundary F1 and, for ``object_classes``, object F1 on whole images."""
    metrics = SegmentationMetrics(classes, ignore_index)
    objects = ObjectTally({name: classes.index(name) for name in object_classes or []}, ignore_index)
    model.eval()
    for item in data:
        image, mask = item.whole()
        probabilities = predict_probabilities(model, normalise(image.numpy(), bands)[None])
        labels, truth = probabilities.argmax(1)[0].cpu().numpy(), mask.numpy()
        metrics.update(labels, truth)
        objects.update(item, labels, truth)
    return metrics.summary() | objects.summary()


def run_epochs(
    session: Session, sink: EpochSink, console: Console, stop_after: int | None = None
) -> CheckpointMetadata:
    """Train from where ``sink`` says the run stopped, keeping every epoch there.

    Each global batch of ``batch_size`` crops is shared out between the ``world`` processes (the gradients
    are averaged across them); crops are drawn from per-epoch random streams, so a resumed run continues
    exactly where it stopped. ``stop_after`` ends this run after that many epochs in total.
    """
    config, model = session.config, session.model
    start_epoch, history = 0, []
    state = sink.resume()
    if state is not None:
        if state["config"] != config.model_dump(mode="json"):
            raise ConfigError(
                f"{sink.where}: a resumable run with other settings exists; delete it or use the same options"
            )
        model.load_state_dict(state["model"])
        session.optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        console.print(f"resuming {sink.where} after epoch {start_epoch}/{config.epochs}")
    main = sink.rank == 0
    session.metadata.training["workers"] = sink.world
    if config.init_from is not None and session.val_data and not history and main:
        # epoch 0: the model it starts from on the same held-out images, for the card's before and after
        start = _validate(session)
        history.append({"epoch": 0, "loss": None, "seconds": 0.0, "val": start})
    trained = sink.wrap(model)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and session.device.type == "cuda")
    settings = AugmentSettings(config.crop_size, config.scale_range, colour_jitter=config.colour_jitter)
    crops_per_epoch = len(epoch_samples(session.train_data, config.crop_size, np.random.default_rng(0)))
    steps_per_epoch = -(-crops_per_epoch // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    val_summary: dict[str, Any] = history[-1].get("val", {}) if history else {}
    with _progress(console if main else Console(quiet=True)) as progress:
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
            trained.train()
            order = epoch_samples(session.train_data, config.crop_size, rng)
            crop_rng = rng if sink.world == 1 else np.random.default_rng([config.seed, epoch, 1 + sink.rank])
            losses = []
            for step_in_epoch in range(steps_per_epoch):
                step = epoch * steps_per_epoch + step_in_epoch
                for group in session.optimizer.param_groups:
                    group["lr"] = poly_lr(config.lr, step, total_steps, config.poly_power)
                batch = order[step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size]
                if len(batch) < 2 * sink.world:  # BatchNorm needs two samples in each process
                    progress.advance(task)
                    continue
                chosen = batch[sink.rank :: sink.world]
                loss = _step(session, trained, scaler, settings, crop_rng, chosen)
                losses.append(loss)
                progress.update(task, advance=1, loss=float(np.mean(losses[-20:])))
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)) if losses else None,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if (
                main
                and session.val_data
                and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs)
            ):
                val_summary = _validate(session)
                record["val"] = val_summary
                progress.update(task, miou=val_summary["miou"])
            history.append(record)
            if main:
                console.print(_epoch_line(record, config.epochs))
            session.metadata = session.metadata.model_copy(
                update={"metrics": {"val": val_summary, "history": history}}
            )
            session.metadata.training["epochs_completed"] = epoch + 1
            sink.keep(session, epoch + 1, history)
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < config.epochs:
                console.print(f"stopping after epoch {epoch + 1}; run the same command again to resume")
                break
    return session.metadata


def _step(
    session: Session,
    trained: nn.Module,
    scaler: torch.amp.GradScaler,
    settings: AugmentSettings,
    rng: np.random.Generator,
    chosen: list[int],
) -> float:
    config, device = session.config, session.device
    crops = [random_crop(session.train_data[i], settings, rng, config.ignore_index) for i in chosen]
    images = torch.stack([normalise(c[0].numpy(), session.bands) for c in crops]).to(device)
    masks = torch.stack([c[1] for c in crops]).to(device)
    session.optimizer.zero_grad(set_to_none=True)
    with autocast_for(device, config.amp):
        logits = trained(images)
        loss = F.cross_entropy(
            logits.float(), masks, weight=session.weights.to(device), ignore_index=config.ignore_index
        )
    scaler.scale(loss).backward()
    scaler.step(session.optimizer)
    scaler.update()
    return float(loss.item())


def _validate(session: Session) -> dict[str, Any]:
    config = session.config
    return evaluate_model(
        session.model, session.val_data, session.bands, config.classes, config.ignore_index, session.object_f1
    )


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
