"""The model's forward pass on a chosen runtime: eager torch, torch.compile, or ONNX Runtime's CPU provider
on an export cached by the checkpoint's sha256.

``predict_probabilities`` calls a runtime as it would a module: logits (N, classes, H, W) for a normalised
(N, bands, H, W) batch. Both runtimes run the same prepared model (``models.optimize.for_inference``); the
export has dynamic batch, height and width, so one file serves every window shape of a scene.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import cast

import torch
from torch import nn

from deeplab_common.atomic import atomic_output
from deeplab_common.errors import ConfigError

# ONNX Runtime's telemetry writes a device id and a SQLite database under ~/.cache/Microsoft/DeveloperTools
# on every session; a batch writes nothing outside --out, so it is off unless the user turns it on. Read when
# the library loads: set before any import of it, in every process that may load it (this module's).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime")
EXPORT_VERSION = 1  # bumped when the export changes: older files are then ignored, not trusted
# Architectures ONNX Runtime is the CPU default for: those measured at least ADOPT_AT x eager with labels
# equal on >= 99.9% of pixels (bench/runtimes.py -> bench/reports/runtimes.md; tests/test_runtime.py checks
# that this set is the report's). The others run eager unless --runtime says otherwise.
ADOPT_AT = 1.3
ONNX_ON_CPU = frozenset({"deeplabv3plus_efficientnet_lite0", "deeplabv2_efficientnet_lite0"})


class ModelRuntime(ABC):
    """A prepared model's forward pass: called with a normalised batch on ``device``, returns logits."""

    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class EagerRuntime(ModelRuntime):
    """The prepared torch module itself, on any device (hooks such as ``models.context``'s apply)."""

    name = "eager"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(device)
        self.model = model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model(batch)
        return result


class CompiledRuntime(EagerRuntime):
    """``torch.compile`` (Inductor) of the prepared module: compiled at its first batch, and again when the
    window shape changes (then with dynamic shapes). Measured 1.0-1.1x eager on the CPU: a choice, not a
    default."""

    name = "compile"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        compiled = cast(nn.Module, torch.compile(model))  # an OptimizedModule: called as the module is
        super().__init__(compiled, device)


class OnnxRuntime(ModelRuntime):
    """ONNX Runtime's CPU provider on ``export``'s file; ``threads`` intra-op threads (as torch would use)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        super().__init__(torch.device("cpu"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's idle threads spin a while before they sleep (its default): measured faster in the
        # engine (bench/reports/runtimes.md), and the spin is bounded, so CRF actors beside it lose little
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # TTA's transposed views are strided: ONNX Runtime reads a dense buffer
        inputs = batch.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": inputs})[0])


def onnxruntime_installed() -> bool:
    return (
        importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    )


def choose_runtime(asked: str | None, device: torch.device, architecture: str) -> str:
    """The runtime a model actor uses: ``asked``, else ONNX Runtime for the architectures it was measured
    faster for (``ONNX_ON_CPU``) when the model runs on the CPU and ONNX Runtime is installed, else eager."""
    if asked is not None:
        if asked not in RUNTIMES:
            raise ConfigError(f"unknown runtime {asked!r} (choose from {', '.join(RUNTIMES)})")
        if asked == "onnxruntime" and device.type != "cpu":
            raise ConfigError(f"--runtime onnxruntime runs on the CPU, not on {device} (use --device cpu)")
        return asked
    if device.type == "cpu" and architecture in ONNX_ON_CPU and onnxruntime_installed():
        return "onnxruntime"
    return "eager"


CACHE_ENV = "DEEPLAB_ONNX_CACHE"  # one folder of exports for every run that sees it


def onnx_cache(work_dir: Path | None = None) -> Path:
    """Where ONNX exports are kept unless a run names a folder: ``DEEPLAB_ONNX_CACHE`` when set, else
    ``work_dir/.onnx`` (the engine's: beside its staging, on storage every actor sees), else the user's
    cache folder."""
    if shared := os.environ.get(CACHE_ENV):
        return Path(shared)
    if work_dir is not None:
        return Path(work_dir) / ".onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deeplab-pipeline" / "onnx"


def export_path(cache: Path, sha256: str) -> Path:
    return Path(cache) / f"{sha256}-v{EXPORT_VERSION}.onnx"


def exported(model: nn.Module, sha256: str, cache: Path, bands: int) -> Path:
    """The ONNX export of ``model`` (the checkpoint ``sha256``, prepared), made once into ``cache``.

    Actors that start together take a lock: one exports (about 20 s) and the others then load its file.
    The file is written under a temporary name and renamed, so a killed export leaves no file to trust."""
    path = export_path(cache, sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            log.info("exporting %s to ONNX at %s", sha256[:12], path)
            with atomic_output(path) as temp:
                _export(model, temp, bands)
    return path


def _export(model: nn.Module, target: Path, bands: int) -> None:
    dynamic = torch.export.Dim.DYNAMIC
    example = torch.zeros(1, bands, 64, 64)
    # the exporter prints its progress on stdout, which belongs to the CLI
    with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        torch.onnx.export(
            model.eval(),
            (example,),
            str(target),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def runtime_for(
    name: str,
    model: nn.Module,
    device: torch.device,
    sha256: str,
    bands: int,
    cache: Path,
    threads: int | None = None,
) -> ModelRuntime:
    """The ``name``d runtime (``choose_runtime``) of the prepared ``model``; ONNX Runtime exports into
    ``cache`` once and uses ``threads`` intra-op threads (None: as many as torch uses)."""
    if name == "eager":
        return EagerRuntime(model, device)
    if name == "compile":
        return CompiledRuntime(model, device)
    if not onnxruntime_installed():
        raise ConfigError("--runtime onnxruntime needs onnxruntime and onnx: pip install onnxruntime onnx")
    path = exported(model, sha256, cache, bands)
    return OnnxRuntime(path, threads or torch.get_num_threads())
