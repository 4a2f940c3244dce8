"""The checkpoint format: one .safetensors file, tensors plus JSON metadata. Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
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
        metadata = CheckpointMetadata.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "its top level"
        raise CheckpointError(f"{path}: invalid checkpoint metadata at {where}: {first['msg']}") from None
    _check_dtypes(path, header, metadata)
    return metadata


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


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# the bytes per element of each safetensors dtype code
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2}
DTYPE_BYTES |= {"BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
WEIGHT_CODES = {"float32": "F32", "float16": "F16"}  # the metadata's weights_dtype as a safetensors code
COUNTER_SUFFIX = ".num_batches_tracked"  # batch-norm counters: int64 whatever the weights' dtype


def _read_header(path: Path) -> dict[str, dict[str, str]]:
    """The safetensors header, checked whole before anything is staged: a regular file, a JSON header of
    bounded size, and tensors whose dtypes, shapes and offsets tile the file's data exactly."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: is not a regular file (a pipe, socket or device), not a checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(9)
        # Header length (8 bytes), then JSON: decided first, as its low byte can be 0x80 like a pickle.
        length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < length <= info.st_size - 8
        if not looks_safetensors:
            if head.startswith(_PICKLE_MAGIC):
                raise CheckpointError(
                    f"{path}: is a pickle/torch.save file; deeplab-pipeline never unpickles model files. "
                    "Convert torchvision state dicts with `deeplab import-torchvision`."
                )
            if len(head) < 9:
                raise CheckpointError(f"{path}: not a checkpoint (file too short)")
            if head[8:9] == b"{" and length > info.st_size - 8:
                raise CheckpointError(
                    f"{path}: truncated: its header claims {length} bytes but the file has {info.st_size}"
                )
            raise CheckpointError(f"{path}: not a safetensors checkpoint (bad header)")
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: its header is {length} bytes, over the {MAX_HEADER_BYTES} allowed"
            )
        handle.seek(8)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: not a safetensors checkpoint (header nested too deep)") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (bad header)")
    _check_tensors(path, header, info.st_size - 8 - length)
    return header


def _check_tensors(path: Path, header: dict[str, object], data_bytes: int) -> None:
    """Every tensor entry well formed, its byte range the size its dtype and shape say, the ranges tiling
    the data section with nothing missing (a truncated file) or left over."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: not a safetensors checkpoint (its __metadata__ is not text by name)")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(entry, dict)
            and entry.get("dtype") in DTYPE_BYTES
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(n, int) and n >= 0 for n in entry["data_offsets"])
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry in the header")
        begin, end = entry["data_offsets"]
        size = math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
        if end - begin != size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({entry['dtype']}, shape {entry['shape']}) needs {size} bytes "
                f"but its offsets give {end - begin}"
            )
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, not {position}: corrupt")
        position = end
    if position > data_bytes:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {position} bytes of data but the file holds {data_bytes}"
        )
    if position < data_bytes:
        raise CheckpointError(f"{path}: {data_bytes - position} bytes after the last tensor: corrupt")


def _check_dtypes(path: Path, header: dict[str, dict[str, str]], metadata: CheckpointMetadata) -> None:
    """Every weight in the dtype the metadata declares (a relabelled dtype reads as other numbers), the
    batch-norm counters int64."""
    expected = WEIGHT_CODES[metadata.weights_dtype]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        wanted = "I64" if name.endswith(COUNTER_SUFFIX) else expected
        if entry["dtype"] != wanted:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {entry['dtype']} but the checkpoint's weights are "
                f"{metadata.weights_dtype} ({wanted}): its dtype was changed, or the file is corrupt"
            )
