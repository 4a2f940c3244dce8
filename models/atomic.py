"""Atomic file output: write to a temporary name in the destination folder, rename into place on success."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=final.suffix or ".tmp", dir=final.parent
    )
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        # mkstemp makes 0600 (and some writers replace the file): publish with the usual permissions.
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomically(path: Path | str, text: str) -> None:
    with atomic_output(path) as temp:
        temp.write_text(text)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
