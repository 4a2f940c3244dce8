"""The checkpoint format: one .safetensors file, tensors plus JSON metadata. Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deeplab_common.atomic import atomic_output
from deeplab_common.digest import file_sha256
from deeplab_common.errors import CheckpointError
from deeplab_common.version import software_version
from models.metadata import CheckpointMetadata
from models.registry import build_model

METADATA_KEY = "deeplab_pipeline"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


@dataclass(frozen=True)
class CheckpointInfo:
    """What identifies a checkpoint without its weights: enough for a driver that never runs the model."""

    metadata: CheckpointMetadata
    path: Path
    sha256: str


def checkpoint_info(path: Path) -> CheckpointInfo:
    return CheckpointInfo(read_metadata(Path(path)), Path(path), file_sha256(Path(path)))


@dataclass
class LoadedModel:
    model: nn.Module
    metadata: CheckpointMetadata
    path: Path
    sha256: str


def save_checkpoint(path: Path, model: nn.Module, metadata: CheckpointMetadata, half: bool = False) -> Path:
    """Write weights and metadata atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    metadata = metadata.model_copy(
        update={"software_version": software_version(), "weights_dtype": "float16" if half else "float32"}
    )
    tensors = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors[key] = tensor.contiguous()
    _write_atomically(path, tensors, metadata)
    return path


def read_metadata(path: Path) -> CheckpointMetadata:
    """Read only the JSON header: cheap, and safe on any file."""
    path = Path(path)
    header = _read_header(path)
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path}: a safetensors file, but not a deeplab-pipeline checkpoint (no metadata)"
        )
    try:
        return CheckpointMetadata.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: invalid checkpoint metadata at {where}: {first['msg']}") from None


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the architecture named in the metadata and load its weights (float32, eval mode)."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors: {exc}") from None
    # the weights come from this file: a "pretrained" recorded at training is never fetched again here
    model = build_model(metadata.architecture, **(metadata.arch_args | {"pretrained": "none"}))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        summary = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {metadata.architecture}: {summary}") from None
    model.eval().to(device)
    return LoadedModel(model=model, metadata=metadata, path=path, sha256=file_sha256(path))


SHIPPED_FOLDER = "deeplab-checkpoints"  # under the node's temp folder: shipped checkpoints, by sha256


def checkpoint_on_this_node(data: bytes, sha256: str) -> Path:
    """A checkpoint shipped as bytes (a cluster node without the driver's files), kept as a file named by its
    sha256 in this node's temp folder, written once per node (atomically: actors may start together)."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"shipped checkpoint {sha256[:12]}...: its bytes arrived changed")
    path = Path(tempfile.gettempdir()) / SHIPPED_FOLDER / f"{sha256}.safetensors"
    if not path.is_file() or path.stat().st_size != len(data):
        with atomic_output(path) as temp:
            temp.write_bytes(data)
    return path


def update_metadata(path: Path, **changes: object) -> CheckpointMetadata:
    """Rewrite a checkpoint with changed metadata fields, tensors untouched (used by tune-crf)."""
    path = Path(path)
    metadata = read_metadata(path).model_copy(update=changes)
    CheckpointMetadata.model_validate(metadata.model_dump())
    _write_atomically(path, load_file(str(path)), metadata)
    return metadata


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: CheckpointMetadata) -> None:
    with atomic_output(path) as temp:
        save_file(tensors, str(temp), metadata={METADATA_KEY: metadata.model_dump_json()})


def _read_header(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(9)
        # Header length (8 bytes), then JSON: decided first, as its low byte can be 0x80 like a pickle.
        length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < length <= path.stat().st_size - 8
        if not looks_safetensors:
            if head.startswith(_PICKLE_MAGIC):
                raise CheckpointError(
                    f"{path}: is a pickle/torch.save file; deeplab-pipeline never unpickles model files. "
                    "Convert torchvision state dicts with `deeplab import-torchvision`."
                )
            if len(head) < 9:
                raise CheckpointError(f"{path}: not a checkpoint (file too short)")
            raise CheckpointError(f"{path}: not a safetensors checkpoint (bad header)")
        handle.seek(8)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (bad header)")
    return header
