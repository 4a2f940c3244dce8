"""The fully connected CRF (Krähenbühl & Koltun, as DeepLab uses it): one model, backends as classes.

- ``pydensecrf``: pydensecrf2's C++ lattice, CPU, one core per call;
- ``torch``: the same mean field on a permutohedral lattice written in torch tensor ops (``lattice``), so one
  code path runs on CPU and on CUDA, batched over windows.

``backend(name, device)`` gives one; ``refine`` and ``refine_labels`` use the CPU default.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from models.metadata import CRFParams
from pipeline.crf.base import CRFBackend, CRFError

__all__ = [
    "BACKEND_NAMES",
    "CPU_DEFAULT",
    "CRFBackend",
    "CRFBackendName",
    "CRFError",
    "CRFParams",
    "backend",
    "refine",
    "refine_labels",
]

CRFBackendName = Literal["pydensecrf", "torch"]
BACKEND_NAMES: tuple[str, ...] = get_args(CRFBackendName)
# what CPU CRF actors run unless told: the faster per core in bench/crf.py (docs/benchmarks.md)
CPU_DEFAULT: CRFBackendName = "pydensecrf"


def backend(name: str = CPU_DEFAULT, device: str = "cpu") -> CRFBackend:
    """The backend ``name`` on ``device`` (torch only: pydensecrf runs on the CPU). Imported on demand: a
    pydensecrf CRF actor never loads torch."""
    if name == "pydensecrf":
        if device != "cpu":
            raise CRFError(f"the pydensecrf CRF backend runs on the CPU only, not on {device!r}")
        from pipeline.crf.pydensecrf_backend import PyDenseCRF

        return PyDenseCRF()
    if name == "torch":
        from pipeline.crf.mean_field import TorchCRF

        return TorchCRF(device)
    raise CRFError(f"unknown CRF backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")


def refine(*args: Any, backend_name: str = CPU_DEFAULT, **kwargs: Any) -> np.ndarray:
    """Refined marginals (classes, H, W) float32: ``CRFBackend.refine`` of the backend ``backend_name``."""
    return backend(backend_name).refine(*args, **kwargs)


def refine_labels(*args: Any, backend_name: str = CPU_DEFAULT, **kwargs: Any) -> np.ndarray:
    """Refined class map (H, W) uint8: ``CRFBackend.refine_labels`` of the backend ``backend_name``."""
    return backend(backend_name).refine_labels(*args, **kwargs)
