"""The output folder's manifest: every run's scenes, keys and outcomes, and what a re-run may skip.

A scene's result is keyed by (input identity, checkpoint sha256, config hash). A run skips a scene whose
last successful result has the same key and whose published files are all still there; anything else is
redone. A local input's identity is its sha256, cached by (size, mtime): a nightly run does not re-read
unchanged scenes; a remote object's is its ETag (or version id) and size, from one HEAD request.
``--verify-inputs`` hashes every input's whole content instead, ignoring the cache.

A scene's id (its folder under ``--out``) belongs to the source and checkpoint that published it: another
source with that id (``2026-12-01/tile.tif`` then ``2026-12-02/tile.tif``), or another checkpoint, is refused
with one line unless the run is told to replace (``--replace``); a replaced scene's record goes, so the source
it held is never taken for unchanged.

The manifest is one JSON file, rewritten atomically under an exclusive lock, so concurrent runs into one
output folder never lose each other's records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from deeplab_common.atomic import write_text_atomically
from deeplab_common.errors import SceneIdTaken, UnreadableManifest
from pipeline.engine.options import RUNTIME_ONLY_OPTIONS, SegmentOptions, is_added, neutral_value
from pipeline.io.sources import (
    Source,
    combined_identity,
    content_identity,
    source_identity,
    source_sha256,
    vrt_declared_checksums,
    vrt_sources,
)
from pipeline.io.stac import SourceCollection

MANIFEST_NAME = "manifest.json"

Outcome = Literal["done", "skipped", "failed"]


def config_hash(options: SegmentOptions) -> str:
    """A hash of the options that determine a result: every field not marked ``runtime``, less the
    ``added_field`` ones while unset or at their neutral value."""
    fields = {
        name: value
        for name, value in options.model_dump(mode="json", exclude=set(RUNTIME_ONLY_OPTIONS)).items()
        if not is_added(name) or value not in (None, neutral_value(name))
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class SceneKey:
    input_identity: str  # ``sha256:...`` or a remote object's ``etag:...;size:...`` (see source_identity)
    checkpoint_sha256: str
    config: str


@dataclass(frozen=True, kw_only=True)
class SceneRecord:
    """One scene's outcome in one run."""

    source: str
    scene_id: str
    outcome: Outcome
    key: SceneKey | None = None
    options: str = ""  # config_hash of the options as given: a re-run with the same ones skips unopened
    message: str = ""
    outputs: dict[str, str] | None = None  # name -> path relative to the output folder
    tiles: dict[str, int] | None = None
    seconds: float | None = None
    finished: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SceneRecord:
        key = data.get("key")
        return cls(**(data | {"key": SceneKey(**key) if key else None}))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest:
    def __init__(self, out_dir: Path, exists: Callable[[str], bool] | None = None) -> None:
        """The manifest in ``out_dir``; ``exists`` says whether a published output (a path relative to
        ``--out``) is there, when ``--out`` is not ``out_dir`` itself (a bucket)."""
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_NAME
        self._exists = exists or (lambda relative: (self.out_dir / relative).is_file())

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"scenes": {}, "checksums": {}, "runs": []}
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UnreadableManifest(
                f"{self.path}: unreadable manifest ({exc}); move it aside to start afresh"
            ) from exc
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock; the body's changes are written atomically."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f".{MANIFEST_NAME}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            write_text_atomically(self.path, json.dumps(data, indent=2))

    def input_identity(self, source: Source, keep: bool = True, verify: bool = False) -> str:
        """The scene's identity in its key. A local file's sha256 comes from the cache while its size and
        mtime are unchanged, and a new one is kept there unless ``keep`` is False (a dry run writes
        nothing); ``verify`` hashes the content whatever the cache says (remote objects too)."""
        if not isinstance(source, Path):
            return source_identity(source, verify=verify)
        if source.suffix.lower() == ".vrt":  # a VRT is what it reads: each source's identity counts
            declared = {} if verify else vrt_declared_checksums(source)  # STAC's file:checksum, if given
            parts = [
                f"multihash:{declared[str(part)]}"
                if str(part) in declared
                else self.input_identity(part, keep, verify)
                for part in vrt_sources(source)
            ]
            # its own text is hashed as it is, not cached: a run rewrites its STAC VRTs, and a cache entry
            # per VRT would rewrite the whole manifest once per scene and run
            return combined_identity(content_identity(source_sha256(source)), parts)
        return self._file_identity(source, keep, verify)

    def _file_identity(self, source: Path, keep: bool, verify: bool) -> str:
        stat = source.stat()
        cached = self.read()["checksums"].get(str(source))
        if (
            not verify
            and cached
            and cached["size"] == stat.st_size
            and cached["mtime_ns"] == stat.st_mtime_ns
        ):
            return content_identity(str(cached["sha256"]))
        digest = source_sha256(source)
        if not keep:
            return content_identity(digest)
        with self._locked() as data:
            data["checksums"][str(source)] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": digest,
            }
        return content_identity(digest)

    def current(self, source: str, key: SceneKey) -> SceneRecord | None:
        """The last successful record of ``source`` if it has this key and its outputs all exist."""
        entry = self.read()["scenes"].get(source)
        if entry is None:
            return None
        record = SceneRecord.from_json(entry)
        return record if record.key == key and self._outputs_exist(record) else None

    def unchanged(
        self, source: str, input_identity: str, checkpoint_sha256: str, options: str
    ) -> SceneRecord | None:
        """The last successful record of ``source`` if it came from this input, checkpoint and options (as
        given, before planning) and its outputs all exist: the scene can be skipped without opening it."""
        entry = self.read()["scenes"].get(source)
        if entry is None:
            return None
        record = SceneRecord.from_json(entry)
        if record.key is None or record.options != options:
            return None
        if (record.key.input_identity, record.key.checkpoint_sha256) != (input_identity, checkpoint_sha256):
            return None
        return record if self._outputs_exist(record) else None

    def check_owner(self, source: str, scene_id: str, checkpoint_sha256: str) -> None:
        """Raise when ``scene_id``'s published outputs came from another source or checkpoint (outputs since
        removed protect nothing: their id is free)."""
        held = [
            record
            for entry in self.read()["scenes"].values()
            if entry["scene_id"] == scene_id and self._outputs_exist(record := SceneRecord.from_json(entry))
        ]
        if not held:
            return
        holder = max(held, key=lambda record: record.finished)
        refusal = "refused, so they are not replaced"
        if holder.source != source:
            raise SceneIdTaken(
                f"{source}: its id '{scene_id}' holds the outputs of {holder.source} in {self.out_dir} "
                f"(published {holder.finished}): {refusal}; rename one, use another --out, or pass --replace"
            )
        if holder.key is not None and holder.key.checkpoint_sha256 != checkpoint_sha256:
            raise SceneIdTaken(
                f"{source}: {self.out_dir}/{scene_id} holds the outputs of another checkpoint (sha256 "
                f"{holder.key.checkpoint_sha256[:12]}, published {holder.finished}): {refusal}; use an --out "
                "per model, or pass --replace"
            )

    def _outputs_exist(self, record: SceneRecord) -> bool:
        return bool(record.outputs) and all(self._exists(path) for path in (record.outputs or {}).values())

    def source_collection(self, found: SourceCollection | None) -> SourceCollection | None:
        """The STAC Collection the folder's scenes come from: ``found`` (this run's inputs), recorded for the
        runs after it, else the one recorded by an earlier run."""
        if found is None:
            recorded = self.read().get("collection")
            return SourceCollection(**recorded) if recorded else None
        with self._locked() as data:
            data["collection"] = asdict(found)
        return found

    def record_scene(self, record: SceneRecord) -> None:
        """Remember a scene's successful result (failures live in the run records only)."""
        if record.outcome != "done":
            return
        with self._locked() as data:
            # one record per id: a source whose outputs this one replaced is no longer published here
            data["scenes"] = {
                source: entry
                for source, entry in data["scenes"].items()
                if entry["scene_id"] != record.scene_id
            }
            data["scenes"][record.source] = record.as_json()

    def record_run(self, run: dict[str, Any], scenes: list[SceneRecord]) -> None:
        with self._locked() as data:
            data["runs"].append(run | {"scenes": [s.as_json() for s in scenes]})
