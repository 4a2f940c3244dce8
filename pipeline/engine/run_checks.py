"""What refuses a whole run before any work, in one line each: the checkpoint (checked whole), a tiling too
large for the machine's memory, an output folder that cannot be written, and an input that names no scene.

Every entry point runs these first: `deeplab segment` through ``run_batch``, and `deeplab run-flow` before it
starts a Prefect server, so a missing model is said in a second, not after a server start and a failed flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.checkpoint import CheckpointInfo, checkpoint_info
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outdir import writable_folder
from pipeline.engine.space import check_window_memory
from pipeline.io.discover import discover_scenes
from pipeline.io.objects import is_object_url
from pipeline.io.sources import is_remote
from pipeline.io.stac_input import is_stac_document


def check_run(
    inputs: Sequence[object],
    model: Path | CheckpointInfo,
    out: Path | str,
    options: SegmentOptions,
    dry_run: bool = False,
) -> CheckpointInfo:
    """The checkpoint's identity once every run-wide check passed (each failure raises a ``DeepLabError``:
    a usage error, exit 2). A dry run leaves ``--out`` as it is (not created, not probed)."""
    info = model if isinstance(model, CheckpointInfo) else checkpoint_info(Path(model).resolve())
    check_window_memory(info.metadata, options.tile, options.cores_per_window, options.batch_size)
    local_out = not (isinstance(out, str) and is_object_url(out))
    # local files, folders and globs only: a bucket listing or a STAC search is a request, made by the run
    local = [
        str(entry)
        for entry in inputs
        if isinstance(entry, str | Path) and not is_remote(str(entry)) and not is_stac_document(str(entry))
    ]
    if local:
        discover_scenes(local, exclude=Path(out).resolve() if local_out else None)
    if local_out and not dry_run:  # last: a run refused for its inputs leaves no folder behind
        writable_folder(out)
    return info
