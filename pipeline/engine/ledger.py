"""Resume state of one scene: ``labels.zarr`` (chunk == core) plus a ledger of finished cores.

A core is recorded only after its chunk is written, so a killed run never records a half-written core.
The ledger is keyed by everything that changes the result (input checksum, checkpoint, options): a
different key starts a fresh ledger and label store instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from deeplab_common import faults
from deeplab_common.atomic import fsync_path, write_text_atomically
from pipeline.io.labels import NODATA_LABEL


def result_key(**parts: Any) -> str:
    """A stable hash of the inputs that determine a scene's output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Ledger:
    def __init__(
        self, folder: Path, key: str, shape: tuple[int, int], tile: int, confidence: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.key = key
        self.tile = tile
        self.labels_path = self.folder / "labels.zarr"
        self.confidence_path = self.folder / "confidence.zarr" if confidence else None
        self.log_path = self.folder / "ledger.jsonl"
        header_path = self.folder / "ledger.json"
        header = {"key": key, "shape": list(shape), "tile": tile, "confidence": confidence}
        current = json.loads(header_path.read_text()) if header_path.exists() else None
        if current != header or not all(p.exists() for p in self._stores):
            self._reset(header, shape)
            write_text_atomically(header_path, json.dumps(header))
        self._done = self._read_done()

    def _reset(self, header: dict[str, Any], shape: tuple[int, int]) -> None:
        self.log_path.unlink(missing_ok=True)  # first: a kill mid-reset must not leave stale records
        for old in (self.folder / "labels.zarr", self.folder / "confidence.zarr"):
            shutil.rmtree(old, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for store in self._stores:
            zarr.create_array(
                store=store,
                shape=shape,
                chunks=(self.tile, self.tile),
                dtype="uint8",
                fill_value=NODATA_LABEL,
                attributes={"key": header["key"]},
            )

    @property
    def _stores(self) -> list[Path]:
        """labels.zarr, then confidence.zarr when kept: one per plane of a core."""
        return [p for p in (self.labels_path, self.confidence_path) if p is not None]

    def _read_done(self) -> set[tuple[int, int]]:
        done: set[tuple[int, int]] = set()
        if not self.log_path.exists():
            return done
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that core is simply computed again
            done.add((int(record["row"]), int(record["col"])))
        return done

    def is_done(self, row: int, col: int) -> bool:
        return (row, col) in self._done

    @property
    def done_count(self) -> int:
        return len(self._done)

    def write_core(self, row: int, col: int, planes: np.ndarray, **stats: Any) -> None:
        """Write one core's labels (and confidence, as a second plane), flush its chunks to the disk, then
        record it (fsync'd): after a power loss, a core on record is a core on the disk."""
        planes = planes[None] if planes.ndim == 2 else planes
        top, left = row * self.tile, col * self.tile
        height, width = planes.shape[-2:]
        if planes.shape[0] != len(self._stores):
            raise ValueError(f"expected {len(self._stores)} plane(s) per core, got {planes.shape[0]}")
        for path, plane in zip(self._stores, planes, strict=True):
            store = zarr.open_array(path, mode="r+")
            store[top : top + height, left : left + width] = plane
            _flush_chunk(path, store, (row, col))
        with open(self.log_path, "a") as handle:
            # "at": when, for throughput from the ledger alone (the cluster benchmark reads it)
            handle.write(json.dumps({"row": row, "col": col, "at": round(time.time(), 3), **stats}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._done.add((row, col))
        faults.passing("ledger-core")

    def labels(self) -> Any:
        return zarr.open_array(self.labels_path, mode="r")

    def confidence(self) -> Any:
        if self.confidence_path is None:
            raise ValueError("this ledger keeps no confidence")
        return zarr.open_array(self.confidence_path, mode="r")


def _flush_chunk(path: Path, store: Any, chunk: tuple[int, int]) -> None:
    """fsync the file holding one chunk of a local zarr store (none when the chunk is all fill value: zarr
    writes no file for it) and its folder, whose entry a new chunk file adds."""
    chunk_file = path / store.metadata.encode_chunk_key(chunk)
    if chunk_file.exists():
        fsync_path(chunk_file)
        fsync_path(chunk_file.parent)
