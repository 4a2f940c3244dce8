"""Where a run's outputs go: ``--out`` as a local folder, or a bucket prefix (``s3://bucket/prefix``, and
the other object stores) whose files are built in a local scratch folder and uploaded scene by scene.

A bucket's scene is uploaded once all its files are written, its ``report.json`` and ``item.json`` last,
so a reader that finds an Item finds every file it lists; files an earlier run left under the scene that
this run did not write are removed. The manifest follows each scene, and the catalog and ``index.html``
end the run. One run writes a prefix at a time (``lease.PrefixLease``). The scratch folder keeps the
staging, the ledgers and a copy of the small files, so a killed run resumes from it on the same machine;
on another, the bucket's manifest and listing say what is published, and the rest is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from deeplab_common.atomic import atomic_output
from deeplab_common.errors import ConfigError, OutputFolderError, UnreachableObject
from pipeline.engine.lease import PrefixLease
from pipeline.engine.manifest import MANIFEST_NAME
from pipeline.engine.outdir import output_folder, output_lock
from pipeline.io import objects
from pipeline.io.index_page import INDEX_NAME
from pipeline.io.report import REPORT_NAME
from pipeline.io.stac import CATALOG_NAME, ITEM_NAME

SCRATCH_ENV = "DEEPLAB_SCRATCH"
LAST = (REPORT_NAME, ITEM_NAME)  # a scene's files uploaded last, in this order: the Item says it is whole
PAGES = (REPORT_NAME, ITEM_NAME)  # what the catalog and index.html are made from
_MANIFEST_ETAG = ".manifest.etag"  # in the scratch folder: the bucket's manifest this copy is


class Output(ABC):
    """``--out``: where the run builds its files (``folder``) and where they are published."""

    folder: Path
    location: str  # as the user named it
    # whether a cluster's nodes must see the work folder: a driver resubmitted on another node resumes
    # from it and publishes there (a local folder), or keeps its own scratch and publishes to a bucket
    shared_work_dir: bool = True

    @abstractmethod
    def hold(self, wait: bool, on_wait: Callable[[str], None]) -> AbstractContextManager[None]:
        """This run's hold on ``--out`` (another run's waits for it, or is refused with ``wait`` False)."""

    def look(self) -> None:
        """Learn what is published, without holding ``--out`` (a dry run); a local folder is looked at
        directly."""
        return None

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether the published output ``relative`` (to ``--out``) is there."""

    def scene_published(self, scene: str, outputs: list[str]) -> None:
        """The scene folder ``scene`` is complete in ``folder``, with ``outputs`` (files or folders,
        relative to ``folder``), and the manifest records it."""
        return None  # a local folder is published where it is written

    def before_pages(self) -> None:
        """The catalog and index.html are about to be made from ``folder``'s scene folders."""
        return None

    def run_recorded(self) -> None:
        """The manifest, catalog and index.html of the run are written in ``folder``."""
        return None

    def local(self, relative: str) -> Path:
        """A published file, as a local path (fetched into ``folder`` when it is only in the bucket)."""
        return self.folder / relative


class LocalOutput(Output):
    def __init__(self, folder: Path) -> None:
        self.folder = output_folder(folder)  # a file named as --out is a usage error, said at once
        self.location = str(self.folder)

    @contextmanager
    def hold(self, wait: bool, on_wait: Callable[[str], None]) -> Iterator[None]:
        with output_lock(self.folder, wait, on_wait):
            yield

    def exists(self, relative: str) -> bool:
        return (self.folder / relative).is_file()


class BucketOutput(Output):
    shared_work_dir = False

    def __init__(self, url: str, scratch: Path) -> None:
        self.prefix = objects.ObjectUrl.parse(url).url.rstrip("/")
        if self.prefix.startswith(("http://", "https://")):
            raise ConfigError(f"--out {url}: an HTTP server is not writable; give s3://, gs:// or az://")
        self.location = self.prefix
        self.folder = output_folder(scratch)
        self.lease = PrefixLease(self.prefix)
        self._published: dict[str, str | None] = {}  # relative key -> its ETag, as listed or uploaded

    @contextmanager
    def hold(self, wait: bool, on_wait: Callable[[str], None]) -> Iterator[None]:
        try:
            with self.lease.hold(wait, on_wait), output_lock(self.folder, wait, on_wait):
                self.look()
                yield
        except UnreachableObject as error:
            raise OutputFolderError(f"--out {self.prefix}: {error}") from None

    def look(self) -> None:
        listing = objects.list_tree(self.prefix)
        self._published = {key: info.etag for key, info in listing.items()}
        self._pull_manifest()

    def exists(self, relative: str) -> bool:
        return relative in self._published

    def scene_published(self, scene: str, outputs: list[str]) -> None:
        self.lease.check()
        files = sorted(key for output in outputs for key in self._files(output))
        body = [name for name in files if Path(name).name not in LAST]
        last = [f"{scene}/{name}" for name in LAST if f"{scene}/{name}" in files]
        stale = [key for key in self._published if key.startswith(f"{scene}/") and key not in files]
        for key in body:
            self._upload(key)
        for key in stale:
            objects.delete(f"{self.prefix}/{key}")
            del self._published[key]
        for key in last:
            self._upload(key)
        self._upload(MANIFEST_NAME)

    def _files(self, output: str) -> list[str]:
        """An output's files by key: the file itself, or every file under an output folder (OME-Zarr)."""
        path = self.folder / output
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return [p.relative_to(self.folder).as_posix() for p in found]

    def before_pages(self) -> None:
        for key in self._published:
            if Path(key).name in PAGES and key.count("/") == 1:
                self.local(key)

    def run_recorded(self) -> None:
        self.lease.check()
        for name in (MANIFEST_NAME, CATALOG_NAME, INDEX_NAME):
            self._upload(name)

    def local(self, relative: str) -> Path:
        path = self.folder / relative
        if not path.is_file() and relative in self._published:
            with atomic_output(path) as temp:
                temp.write_bytes(objects.get_bytes(f"{self.prefix}/{relative}"))
        return path

    def _upload(self, key: str) -> None:
        etag = objects.put_file(f"{self.prefix}/{key}", self.folder / key)
        self._published[key] = etag
        if key == MANIFEST_NAME:
            (self.folder / _MANIFEST_ETAG).write_text(etag or "")

    def _pull_manifest(self) -> None:
        """The bucket's manifest is the record; the scratch copy is used as it is when it is that version."""
        local, etag = self.folder / MANIFEST_NAME, self._published.get(MANIFEST_NAME)
        if etag is None:
            local.unlink(missing_ok=True)  # a new prefix: whatever the scratch folder held is not published
            return
        marker = self.folder / _MANIFEST_ETAG
        if local.is_file() and marker.is_file() and marker.read_text() == etag:
            return
        with atomic_output(local) as temp:
            temp.write_bytes(objects.get_bytes(f"{self.prefix}/{MANIFEST_NAME}"))
        marker.write_text(etag)


def scratch_folder(url: str, scratch: str | None) -> Path:
    """Where a bucket ``--out`` is built: ``scratch`` (--scratch), else ``DEEPLAB_SCRATCH``, else the system's
    temp folder, one folder per prefix (kept between runs: a re-run resumes from it)."""
    base = Path(scratch or os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "deeplab-scratch")
    name = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return base / name


def output_for(out: Path | str, scratch: str | None = None) -> Output:
    """The output ``--out`` names: a bucket prefix for an object URL, else a local folder."""
    if isinstance(out, str) and objects.is_object_url(out):
        return BucketOutput(out, scratch_folder(out, scratch))
    return LocalOutput(Path(out))
