"""Import torchvision's pretrained DeepLab-v3 state dicts (COCO/VOC) into the checkpoint format.

The one place a torch file is read: ``torch.load(weights_only=True)``, which loads tensors and plain
containers only and refuses any pickled object.
"""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError

import torch

from deeplab_common.errors import CheckpointError
from models.checkpoint import save_checkpoint
from models.metadata import BandInfo, CheckpointMetadata, default_classes
from models.registry import build_model, get_architecture

SUPPORTED = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: state dict not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (UnpicklingError, RuntimeError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a plain tensor state dict ({reason})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def import_torchvision_state_dict(
    path: Path, architecture: str, classes: list[str], out: Path
) -> CheckpointMetadata:
    if architecture not in SUPPORTED:
        raise CheckpointError(
            f"{architecture}: torchvision publishes no DeepLab weights for it ({SUPPORTED})"
        )
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("aux_classifier.")}
    head = state.get("classifier.4.weight")
    if head is None:
        raise CheckpointError(f"{path}: no classifier.4.weight; not a torchvision DeepLab-v3 state dict")
    if head.shape[0] != len(classes):
        raise CheckpointError(
            f"{path}: its classifier has {head.shape[0]} classes, {len(classes)} names given"
        )
    arch = get_architecture(architecture)
    arch_args: dict[str, object] = {
        "num_classes": len(classes),
        "in_channels": 3,
        "output_stride": arch.default_output_stride,
    }
    model = build_model(architecture, len(classes), 3, arch.default_output_stride)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit {architecture}: {str(exc).splitlines()[0]}") from None
    means, stds = arch.imagenet_normalisation
    metadata = CheckpointMetadata(
        architecture=architecture,
        arch_args=arch_args,
        classes=default_classes(classes),
        bands=[
            BandInfo(name=n, mean=m, std=s)
            for n, m, s in zip(("red", "green", "blue"), means, stds, strict=True)
        ],
        ignore_index=255,
        training={"source": "torchvision pretrained state dict", "file": Path(path).name},
    )
    save_checkpoint(out, model, metadata)
    return metadata
