"""Atomic, durable file output: write to a temporary name beside the target, fsync it, rename it into place,
fsync the folder; a kill at any point leaves the old file or the new one, never a part of one.

Temporary names start with ``PARTIAL_PREFIX``: whatever carries it after a run ended is a dead run's debris,
and the next run into the folder removes it (``pipeline.engine.outdir``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_PREFIX = ".partial-"


def _read_umask() -> int:
    """The process umask, read without setting it: ``os.umask`` can only set it, and setting it (even back
    at once) races every other thread creating files meanwhile. Linux says it in /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # at import, before the engine starts threads: the one place it is set and reset
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def fsync_path(path: Path | str) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(path: Path | str) -> None:
    """Every file under ``path`` (or ``path`` itself), then the folders, deepest first."""
    root = Path(path)
    if not root.is_dir():
        fsync_path(root)
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def partial_name(final: Path) -> Path:
    """A fixed temporary name beside ``final`` for outputs built as folders (zarr stores)."""
    return final.with_name(f"{PARTIAL_PREFIX}{final.name}")


def replace_durably(built: Path, final: Path) -> None:
    """Rename ``built`` (a file or a folder, already complete) over ``final``: its data flushed first, the
    folder entry after, so that the name never points at unwritten blocks after a power loss."""
    fsync_tree(built)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(built, final)
    fsync_path(final.parent)


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f"{PARTIAL_PREFIX}{final.name}.", suffix=final.suffix or ".tmp", dir=final.parent
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        # mkstemp makes 0600 (and some writers replace the file): publish with the usual permissions.
        os.chmod(temp, 0o666 & ~_read_umask())
        replace_durably(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomically(path: Path | str, text: str) -> None:
    with atomic_output(path) as temp:
        temp.write_text(text)
