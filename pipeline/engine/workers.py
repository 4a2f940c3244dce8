"""The per-window work, as plain classes: Ray wraps them as actors; the local engine calls them directly."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.metadata import CRFParams
from pipeline.engine.grid import PendingCore, Tile, core_of, crf_reach, crop_window, narrowed, read_window
from pipeline.engine.ledger import Ledger
from pipeline.io.labels import CONFIDENCE_SCALE, NODATA_LABEL

if TYPE_CHECKING:  # torch and torchvision load only where a model runs: CRF actors never import them
    from models.checkpoint import LoadedModel


@dataclass(frozen=True)
class WindowSpec:
    """What each window goes through: the same for the Ray and the local engine."""

    crf: CRFParams | None
    input_max: float
    crf_backend: str = "pydensecrf"
    crf_device: str = "cpu"  # gpu: refined inside the model actor, on its device (``segment_cores``)
    scales: tuple[float, ...] = (1.0,)
    fuse: str = "max"
    tta: str = "none"
    batch_size: int = 4
    device: str = "auto"
    amp: bool = True
    runtime: str | None = None  # the model's runtime asked for (None: ``models.runtime.choose_runtime``'s)
    onnx_cache: str | None = None  # where ONNX exports are kept (the driver's choice; any actor may export)
    probabilities: bool = False
    context: np.ndarray | None = None  # --context scene: (branches, channels) pooled features of the scene

    @property
    def crf_on_actors(self) -> bool:
        """Whether windows go on to CRF actors (else the model actor finishes each core itself)."""
        return self.crf is not None and self.crf_device == "cpu"


# The cores of ``todo`` that one window yields: one, or those of a block (--cores-per-window) still to do.
WindowCores = list[PendingCore]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Linux's VmHWM belongs to the process image; getrusage's ru_maxrss survives exec, so a process started
    from a large parent would report the parent's peak (a benchmark driver, say).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryReporting:
    """Actors report their own peak memory: the engine's report and the benchmark read it."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


class ModelWorker(MemoryReporting):
    """Holds one model; turns batches of windows into class probabilities (or labels without CRF)."""

    def __init__(
        self,
        checkpoint: str | bytes,
        *,
        checkpoint_sha256: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        amp: bool = False,
        loaded: LoadedModel | None = None,
        runtime: str | None = None,
        onnx_cache: str | None = None,
    ) -> None:
        """``checkpoint``: its path, or its bytes shipped to a node that cannot see the driver's files (then
        with ``checkpoint_sha256``: kept on the node by it, once); ``runtime``: the forward pass's runtime
        (None: ``choose_runtime``'s for this device and model); ``onnx_cache``: the folder ONNX Runtime's
        export is kept in (None: ``runtime.onnx_cache()``)."""
        import torch

        from models.checkpoint import checkpoint_on_this_node, load_checkpoint
        from models.inference import pick_device
        from models.optimize import for_inference
        from models.runtime import choose_runtime, runtime_for
        from models.runtime import onnx_cache as default_onnx_cache

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors: choose deliberately
        self.device = pick_device(device)
        if isinstance(checkpoint, bytes):
            if checkpoint_sha256 is None:
                raise ValueError("a shipped checkpoint needs its sha256")
            checkpoint = str(checkpoint_on_this_node(checkpoint, checkpoint_sha256))
        self.loaded = loaded or load_checkpoint(Path(checkpoint), device=self.device)
        # BatchNorm folded, channels last: 1.5-1.8x faster on CPU, the same outputs up to float rounding
        self.model = for_inference(self.loaded.model)
        self.amp = amp
        name = choose_runtime(runtime, self.device, self.loaded.metadata.architecture)
        cache = Path(onnx_cache) if onnx_cache else default_onnx_cache()
        self.forward = runtime_for(
            name, self.model, self.device, self.loaded.sha256, self.loaded.metadata.num_bands, cache, threads
        )

    def runtime_name(self) -> str:
        """The runtime this worker's forward pass runs on (what ``choose_runtime`` chose)."""
        return self.forward.name

    def predict_for(self, windows: list[np.ndarray], spec: WindowSpec) -> list[np.ndarray]:
        """``predict`` as ``spec`` says: probabilities when the CRF follows, else labels (and confidence)."""
        return self.predict(
            windows,
            spec.scales,
            spec.fuse,
            spec.crf is not None,
            spec.probabilities,
            spec.context,
            tta=spec.tta,
        )

    def predict(
        self,
        windows: list[np.ndarray],
        scales: tuple[float, ...],
        fuse: str,
        as_probabilities: bool,
        with_confidence: bool = False,
        context: np.ndarray | None = None,
        tta: str = "none",
    ) -> list[np.ndarray]:
        """Per window: float16 probabilities (classes, H, W) for the CRF, else ``labels_of`` them.
        ``tta``: the test-time views averaged (``models.inference.TTA_VIEWS``).

        ``context``: (branches, channels) scene-level pooled features for DeepLab-v3's image pooling."""
        import torch

        probabilities = self._probabilities(windows, scales, fuse, context, tta)
        if as_probabilities:
            return list(probabilities.cpu().numpy().astype(np.float16))  # halves the object-store traffic
        top, labels = probabilities.max(1)
        planes = [labels.to(torch.uint8)]
        if with_confidence:
            planes.append(torch.round(top.float() * CONFIDENCE_SCALE).to(torch.uint8))
        return list(torch.stack(planes, 1).cpu().numpy())

    def segment_cores(
        self, windows: list[np.ndarray], cores: list[list[Tile]], spec: WindowSpec
    ) -> list[list[np.ndarray]]:
        """Each core's ``labels_of`` planes (``cores[i]``: those of window i), finished here: without the CRF,
        or with it on this actor's device (``--crf-device gpu``): the windows' probabilities stay on the
        device, every core is cut to its CRF reach and the whole batch is refined in one lattice; only the
        cores' labels leave. The same arithmetic as a CRF actor's, on the same float16-rounded input."""
        import torch

        if spec.crf is None:
            results = self.predict_for(windows, spec)
            return [[core_of(r, t) for t in tiles] for r, tiles in zip(results, cores, strict=True)]
        from pipeline.crf.mean_field import TorchCRF  # the one backend that runs on any device

        crf = TorchCRF(self.device)
        probabilities = self._probabilities(windows, spec.scales, spec.fuse, spec.context, spec.tta)
        probabilities = probabilities.half().float()  # what a CRF actor receives: equal results anywhere
        inner, cut_probabilities, cut_windows = [], [], []
        for index, tiles in enumerate(cores):
            image = torch.from_numpy(np.ascontiguousarray(windows[index])).to(self.device)
            for tile in tiles:
                inner.append(crf_tile(tile, spec.crf))
                cut_probabilities.append(crop_window(probabilities[index], tile, inner[-1]))
                cut_windows.append(crop_window(image, tile, inner[-1]))
        refined = crf.refine_tensors(cut_probabilities, cut_windows, spec.crf, spec.input_max)
        planes = iter(
            labels_of(core_of(marginals, tile).cpu().numpy(), spec.probabilities)
            for marginals, tile in zip(refined, inner, strict=True)
        )
        return [[next(planes) for _ in tiles] for tiles in cores]

    def _probabilities(
        self,
        windows: list[np.ndarray],
        scales: tuple[float, ...],
        fuse: str,
        context: np.ndarray | None,
        tta: str,
    ) -> Any:
        """Softmax probabilities (N, classes, H, W) of the windows, a tensor on this actor's device. A scene
        ``context`` is a hook on the torch module's image pooling: it runs eager whatever the runtime."""
        import torch

        from models.context import fixed_context
        from models.inference import normalise, predict_probabilities

        batch = torch.stack([normalise(w, self.loaded.metadata.bands) for w in windows])
        if context is not None:
            with fixed_context(self.model, list(torch.from_numpy(context))):
                return predict_probabilities(
                    self.model, batch, scales=scales, fuse=fuse, amp=self.amp, tta=tta
                )
        return predict_probabilities(
            self.forward, batch, scales=scales, fuse=fuse, amp=self.amp, tta=tta, device=self.device
        )

    def context_sums(
        self, windows: list[np.ndarray], cores: list[list[Tile]], threads: int | None = None
    ) -> np.ndarray:
        """(branches, channels + 1): the features each image-pooling branch averages, summed over the cells
        of the cores of each window (``cores[i]``: those of window i; last column: the number of cells).
        Summed over a scene's cores and divided, they give the scene's pooled vector. ``threads``: torch
        threads for this call only."""
        import torch

        from models.context import cell_span, pooled_inputs
        from models.inference import normalise, padded_size, predict_probabilities

        batch = torch.stack([normalise(w, self.loaded.metadata.bands) for w in windows])
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with pooled_inputs(self.model) as seen:
                predict_probabilities(self.model, batch, amp=self.amp)
        finally:
            torch.set_num_threads(before)
        if not seen:
            raise ValueError(f"{self.loaded.path}: the model has no image-pooling branch to give a context")
        padded = [padded_size(side) for side in batch.shape[-2:]]
        sums = np.zeros((len(seen), seen[0].shape[1] + 1))
        for branch, features in enumerate(seen):
            cells_h, cells_w = features.shape[-2:]
            for index, tile in ((i, t) for i, tiles in enumerate(cores) for t in tiles):
                top, left = tile.window[:2]
                r0, r1 = cell_span(tile.core_top - top, tile.core_height, padded[0], cells_h)
                c0, c1 = cell_span(tile.core_left - left, tile.core_width, padded[1], cells_w)
                core = features[index, :, r0:r1, c0:c1].double()
                sums[branch, :-1] += core.sum((1, 2)).cpu().numpy()
                sums[branch, -1] += (r1 - r0) * (c1 - c0)
        return sums

    def device_name(self) -> str:
        return str(self.device)


def crf_inputs(
    tile: Tile, probabilities: np.ndarray, window: np.ndarray, params: CRFParams
) -> tuple[Tile, np.ndarray, np.ndarray]:
    """What a CRF job needs: the core with its kernels' reach of context, not the model's (often 4x the
    pixels, and the CRF's time grows with them). Returns the narrowed tile and both arrays cut to it."""
    inner = crf_tile(tile, params)
    cut = [np.ascontiguousarray(crop_window(a, tile, inner)) for a in (probabilities, window)]
    return inner, cut[0], cut[1]


def crf_tile(tile: Tile, params: CRFParams) -> Tile:
    """``tile`` with only the context the CRF's kernels reach (3 σ of the widest)."""
    return narrowed(tile, crf_reach(params.sigma_alpha, params.sigma_gamma))


class CRFWorker(MemoryReporting):
    def refine_core(
        self,
        probabilities: np.ndarray,
        window: np.ndarray,
        params: CRFParams,
        input_max: float,
        tile: Tile,
        with_confidence: bool = False,
        backend: str = "pydensecrf",
    ) -> np.ndarray:
        """The core's ``labels_of`` the CRF's marginals, over the core and the CRF's reach (``crf_inputs``:
        a no-op where the caller cut the arrays already), by the CRF ``backend`` on this CPU."""
        from pipeline.crf import refine

        tile, probabilities, window = crf_inputs(tile, probabilities, window, params)
        refined = refine(probabilities.astype(np.float32), window, params, input_max, backend_name=backend)
        return labels_of(core_of(refined, tile), with_confidence)


def context_of(sums: np.ndarray) -> np.ndarray:
    """Summed ``context_sums`` of a scene's cores -> the scene's (branches, channels) pooled features."""
    return sums[:, :-1] / np.maximum(sums[:, -1:], 1.0)


def local_context_sums(
    worker: ModelWorker, image: Any, todo: list[PendingCore], batch_size: int
) -> np.ndarray:
    """``context_sums`` over every core of ``todo``, in this process (the local engine, benchmarks, tests)."""
    parts = [
        worker.context_sums(read_windows(image, batch), tiles_of(batch))
        for batch in window_batches(todo, batch_size)
    ]
    return np.sum(parts, axis=0)


def labels_of(probabilities: np.ndarray, with_confidence: bool) -> np.ndarray:
    """(classes, H, W) probabilities -> (1 or 2, H, W) uint8: class ids, then the top probability x 254."""
    planes = [probabilities.argmax(0).astype(np.uint8)]
    if with_confidence:
        planes.append(np.round(probabilities.max(0) * CONFIDENCE_SCALE).astype(np.uint8))
    return np.stack(planes)


def window_batches(todo: Sequence[PendingCore], cores: int) -> list[list[WindowCores]]:
    """The windows that ``todo``'s cores need, each once with its cores, in batches of one window shape
    (edge windows are smaller) holding about ``cores`` cores (at least one window), in scan order."""
    by_window: dict[tuple[int, int, int, int], WindowCores] = {}
    for item in todo:
        by_window.setdefault(item[0].window, []).append(item)
    by_shape: dict[tuple[int, int], list[WindowCores]] = {}
    for window, members in by_window.items():
        by_shape.setdefault(window[2:], []).append(members)
    batches: list[list[WindowCores]] = []
    for windows in by_shape.values():
        batch: list[WindowCores] = []
        held = 0  # cores in ``batch``
        for members in windows:
            if batch and held + len(members) > cores:
                batches.append(batch)
                batch, held = [], 0
            batch.append(members)
            held += len(members)
        batches.append(batch)
    return batches


def read_windows(image: Any, batch: list[WindowCores]) -> list[np.ndarray]:
    """The pixels of each window of ``batch`` (the window its cores share)."""
    return [read_window(image, members[0][0]) for members in batch]


def tiles_of(batch: list[WindowCores]) -> list[list[Tile]]:
    return [[tile for tile, _ in members] for members in batch]


def cores_in(batch: list[WindowCores]) -> int:
    return sum(len(members) for members in batch)


def write_core(
    ledger: Ledger, tile: Tile, valid: np.ndarray | None, planes: np.ndarray, node: str | None = None
) -> None:
    """``planes`` (1 or 2, h, w): labels and optionally confidence; invalid pixels become nodata in both.

    ``node``: where the core was computed (the Ray engine's node label), kept in the ledger's record."""
    if valid is not None:
        planes = np.where(valid, planes, NODATA_LABEL)
    extra = {"node": node} if node else {}
    ledger.write_core(tile.row, tile.col, planes.astype(np.uint8), **extra)
