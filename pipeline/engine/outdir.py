"""The output folder (``--out``): one writer at a time, a dead run's debris cleaned, every write kept inside.

- ``output_lock``: an exclusive ``flock`` on ``--out/.lock``, held for the whole run. The kernel drops it
  when its holder exits, killed or not, so a lock never outlives its run. A second run waits (saying for
  whom) or, with ``--no-wait``, is refused at once (``OutputBusy``, exit code 3).
- ``clean_debris``: once the lock is held, temporary names no live run can own are a dead run's: partial
  outputs (``.partial-*``), staging folders, Ray session folders. They are removed before any work.
- ``writable_folder``: ``--out`` created and probed with a temporary file (one line when it cannot be).
- ``inside``: the path a write goes to, resolved (symlinks followed), must lie under ``--out``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from deeplab_common.atomic import PARTIAL_PREFIX
from deeplab_common.errors import OutputBusy, OutputFolderError, OutsideOutputFolder

LOCK_NAME = ".lock"
WORK_NAME = ".work"  # staging, ledgers and Ray's session folders of the scenes
RAY_PREFIX = "ray-"  # a run's own Ray temp dir under .work (or deeplab-ray-* in the system's temp dir)
RAY_OWNER = "deeplab-owner"  # in a Ray temp dir: the output folder and pid of the run that made it


def output_folder(out_dir: Path | str) -> Path:
    """``--out`` resolved; a path that exists and is not a folder is a usage error, not a traceback."""
    folder = Path(out_dir).resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(
            f"--out {out_dir}: is a file, not a folder: give a folder (it is created if absent)"
        )
    return folder


def writable_folder(out_dir: Path | str) -> Path:
    """``--out`` resolved and created, and checked writable: a read-only filesystem, /proc or /sys is a
    usage error in one line before any work."""
    folder = output_folder(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PARTIAL_PREFIX):
            pass
    except OSError as error:
        raise _unwritable(out_dir, error) from None
    return folder


def _unwritable(out_dir: Path | str, error: OSError) -> OutputFolderError:
    return OutputFolderError(
        f"--out {out_dir}: cannot be written ({error.strerror}): give a folder this user can write"
    )


def inside(out_dir: Path, path: Path) -> Path:
    """``path``, checked to resolve under ``out_dir``: a symlinked scene folder must not carry a write to
    wherever it points."""
    resolved, root = Path(path).resolve(), Path(out_dir).resolve()
    if not resolved.is_relative_to(root):
        raise OutsideOutputFolder(
            f"{path}: resolves to {resolved}, outside the output folder {root}: nothing written"
        )
    return resolved


def _holder() -> str:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {when}"


@contextmanager
def output_lock(
    out_dir: Path, wait: bool = True, on_wait: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold ``out_dir`` for this run; yields the folder."""
    folder = writable_folder(out_dir)
    try:
        handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _unwritable(out_dir, error) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 512, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise OutputBusy(
                    f"{folder}: another run is writing into this folder ({holder}); refused (--no-wait)"
                ) from None
            if on_wait is not None:
                on_wait(f"{folder}: another run is writing into this folder ({holder}); waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        os.ftruncate(handle, 0)
        os.pwrite(handle, _holder().encode(), 0)
        yield folder
    finally:
        os.close(handle)  # releases the lock; the file stays (removing it races the next run's open)


def _is_debris(entry: Path) -> bool:
    return entry.name.startswith(PARTIAL_PREFIX) or (
        entry.parent.name == WORK_NAME and entry.name.startswith(RAY_PREFIX)
    )


def clean_debris(out_dir: Path) -> list[Path]:
    """Remove what dead runs left in ``out_dir`` (call it with the lock held); returns what was removed.

    Looks where the engine writes temporary names: ``--out`` itself, each scene's folder, ``.work`` and each
    scene's work folder; zarr stores are not descended into."""
    folder = Path(out_dir)
    removed: list[Path] = []
    places = [folder, folder / WORK_NAME]
    places += [child for place in list(places) if place.is_dir() for child in _folders(place)]
    for place in places:
        for entry in list(place.iterdir()) if place.is_dir() else []:
            if _is_debris(entry):
                remove_path(entry)
                removed.append(entry)
    removed += _clean_system_ray_dirs(folder)
    return removed


def _folders(place: Path) -> list[Path]:
    return [
        child
        for child in place.iterdir()
        if child.is_dir() and not child.is_symlink() and not _is_debris(child) and child.suffix != ".zarr"
    ]


def remove_path(entry: Path) -> None:
    """A file, link or folder, gone (a link itself, never what it points at)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _clean_system_ray_dirs(folder: Path) -> list[Path]:
    """Ray temp dirs this output folder's dead runs made in the system's temp dir (paths too long for
    Ray's sockets under ``--out``): each names its run in ``RAY_OWNER``."""
    removed = []
    for entry in Path(tempfile.gettempdir()).glob("deeplab-ray-*"):
        try:
            owner, pid = (entry / RAY_OWNER).read_text().splitlines()[:2]
        except (OSError, ValueError):
            continue
        if owner == str(folder) and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
