"""The per-window work, as plain classes: Ray wraps them as actors; the local engine calls them directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.checkpoint import LoadedModel
from models.metadata import CRFParams
from pipeline.grid import Tile, core_of
from pipeline.ledger import NODATA_LABEL, Ledger


class ModelWorker:
    """Holds one model; turns batches of windows into class probabilities (or labels without CRF)."""

    def __init__(
        self, checkpoint: str, device: str, threads: int | None, amp: bool, loaded: LoadedModel | None = None
    ) -> None:
        import torch

        from models.checkpoint import load_checkpoint
        from models.inference import pick_device

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in actors: choose deliberately
        self.device = pick_device(device)
        self.loaded = loaded or load_checkpoint(Path(checkpoint), device=self.device)
        self.amp = amp

    def predict(
        self, windows: list[np.ndarray], scales: tuple[float, ...], fuse: str, as_probabilities: bool
    ) -> list[np.ndarray]:
        import torch

        from models.inference import normalise, predict_probabilities

        batch = torch.stack([normalise(w, self.loaded.metadata.bands) for w in windows])
        probabilities = predict_probabilities(
            self.loaded.model, batch, scales=scales, fuse=fuse, amp=self.amp
        )
        if as_probabilities:
            return list(probabilities.cpu().numpy().astype(np.float16))  # halves the object-store traffic
        return list(probabilities.argmax(1).to(torch.uint8).cpu().numpy())

    def device_name(self) -> str:
        return str(self.device)


class CRFWorker:
    def refine_core(
        self, probabilities: np.ndarray, window: np.ndarray, params: CRFParams, input_max: float, tile: Tile
    ) -> np.ndarray:
        from pipeline.crf import refine

        refined = refine(probabilities.astype(np.float32), window, params, input_max)
        return core_of(refined, tile).argmax(0).astype(np.uint8)


def same_shape_batches(todo: list[tuple[Tile, np.ndarray]], size: int) -> list[list[tuple[Tile, np.ndarray]]]:
    """Batches of windows of one shape (edge windows are smaller), in scan order within each shape."""
    by_shape: dict[tuple[int, int], list[tuple[Tile, np.ndarray]]] = {}
    for item in todo:
        by_shape.setdefault(item[0].window[2:], []).append(item)
    return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]


def write_core(ledger: Ledger, tile: Tile, valid: np.ndarray, labels: np.ndarray) -> None:
    ledger.write_core(tile.row, tile.col, np.where(valid, labels, NODATA_LABEL).astype(np.uint8))
