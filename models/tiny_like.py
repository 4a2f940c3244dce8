"""A tiny checkpoint with a zoo model's metadata: a real file the engine runs as it does the zoo model, at a
fraction of the cost, for the tests of plumbing and the benchmarks of input and output."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_like(zoo_checkpoint: Path, out: Path, seed: int = 0) -> Path:
    """A ``deeplabv2_tiny`` checkpoint with the metadata of a zoo model (classes and roles, bands, pixel size
    or µm/px, CRF and its verdict), weights drawn from ``seed``: a real checkpoint file that the engine
    preflights, tiles, runs and publishes as it does the zoo model, at a fraction of the cost. For the tests
    of plumbing; what the masks hold means nothing."""
    from models.checkpoint import read_metadata, save_checkpoint
    from models.registry import build_model

    zoo = read_metadata(zoo_checkpoint)
    arch_args: dict[str, object] = {"num_classes": zoo.num_classes, "in_channels": zoo.num_bands}
    metadata = zoo.model_copy(
        update={
            "architecture": "deeplabv2_tiny",
            "arch_args": arch_args,
            "tiling": None,
            "tiling_tuning": None,
            "tta": None,
            "input_scales": None,
            "training": {"note": f"untrained (seed {seed}); metadata of {zoo_checkpoint.name}"},
            "metrics": {},
            "weights_dtype": "float32",
        }
    )
    torch.manual_seed(seed)
    model = build_model("deeplabv2_tiny", num_classes=zoo.num_classes, in_channels=zoo.num_bands)
    return save_checkpoint(out, model, metadata)
