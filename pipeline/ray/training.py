"""`deeplab train --ray-address` / `--workers`: the project's own training loop in N Ray Train workers
(`TorchTrainer`; DDP over gloo on CPUs, NCCL on GPUs), each epoch's checkpoint kept in the run's storage (a
path every node sees, or a bucket), and a killed run resumed from its last checkpoint when the same command
runs again (Ray Train restores a run of the same name from its storage)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from deeplab_common.atomic import atomic_output
from models.checkpoint import read_metadata, save_checkpoint
from models.metadata import CheckpointMetadata
from models.train import TrainConfig, start_session
from models.train_loop import EpochSink, Session, run_epochs, training_state
from models.training_images import TrainingImage
from pipeline.ray.session import ray_session

CHECKPOINT_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def run_name(out: Path, config: TrainConfig) -> str:
    """The same command (same output, same settings) names the same run, so running it again resumes."""
    settings = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return f"{out.stem}-{hashlib.sha256(f'{out.resolve()}|{settings}'.encode()).hexdigest()[:12]}"


def default_storage(out: Path) -> str:
    """Beside the checkpoint: right for a cluster on one machine or a shared file system."""
    return str(out.resolve().with_name(out.name + ".ray-train"))


def train_on_ray(
    config: TrainConfig,
    train_data: list[TrainingImage],
    val_data: list[TrainingImage],
    out: Path,
    data_description: dict[str, Any],
    console: Console,
    workers: int,
    ray_address: str | None = None,
    storage: str | None = None,
    stop_after: int | None = None,
    command: str = "",
    max_failures: int = 2,
) -> CheckpointMetadata:
    """Train with ``workers`` Ray Train workers and write the last checkpoint to ``out``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = storage or default_storage(out)
    name = run_name(out, config)
    with ray_session(out.resolve().parent, ray_address, log_to_driver=True) as ray:
        use_gpu = config.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= workers
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "train": train_data,
                "val": val_data,
                "description": data_description,
                "command": command,
                "stop_after": stop_after,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        console.print(
            f"training on Ray: {workers} workers ({'NCCL on GPUs' if use_gpu else 'gloo on CPUs'}), "
            f"checkpoints in {storage}/{name}"
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} reported no checkpoint")
    with result.checkpoint.as_directory() as folder, atomic_output(out) as temp:
        shutil.copyfile(Path(folder) / CHECKPOINT_FILE, temp)
    return read_metadata(out)


def _worker_loop(settings: dict[str, Any]) -> None:
    """One Ray Train worker: the session built as on one machine, its epochs kept through Ray Train."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    console = Console(stderr=True, quiet=rank != 0)
    config = TrainConfig.model_validate(settings["config"])
    session = start_session(
        config,
        settings["train"],
        settings["val"],
        settings["description"],
        settings["command"],
        console,
        device=ray.train.torch.get_device(),
    )
    run_epochs(session, RaySink(), console, settings["stop_after"])


class RaySink(EpochSink):
    """Epochs kept as Ray Train checkpoints (rank 0 writes them; every worker reports each epoch)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.where = f"Ray Train run {context.get_experiment_name()}"

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def resume(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return dict(torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True))

    def keep(self, session: Session, epoch: int, history: list[dict[str, Any]]) -> None:
        import ray.train

        metrics = {"epoch": epoch, "loss": history[-1].get("loss")}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                kept = Path(folder) / CHECKPOINT_FILE
                save_checkpoint(kept, session.model, session.metadata, half=session.config.half)
                torch.save(training_state(session, epoch, history), Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
