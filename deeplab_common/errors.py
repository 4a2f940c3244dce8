"""The project's exceptions, all in one place: a base that carries the exit code, and a class for each
failure a user meets. Each message is meant for a person: one line (a line per problem) naming the file at
fault; the CLI prints it instead of a traceback and exits with the class's code.

A scene's own problem (``SceneError`` and below) fails that scene alone: the batch goes on with the others.
The rest stop the run before any work: nothing can run with a bad checkpoint, option or output folder.
"""

from __future__ import annotations


class DeepLabError(Exception):
    """Base class: printed as one line; the process exits with ``exit_code``."""

    exit_code = 2  # a usage error: nothing ran


class ConfigError(DeepLabError):
    """An option, or a combination of options, is invalid."""


class OutputFolderError(ConfigError):
    """``--out`` cannot be the run's output folder: a file, or a place this user cannot write."""


class OutputBusy(DeepLabError):
    """Another run is writing into the output folder, and this one was told not to wait (``--no-wait``)."""

    exit_code = 3


class CheckpointError(DeepLabError):
    """A checkpoint is missing, unsafe, corrupt or does not match what it is used with."""


class DataError(DeepLabError):
    """An image, mask, listing or record is unreadable or inconsistent."""


class UnreadableManifest(DataError):
    """The output folder's manifest cannot be read: the run refuses to guess what is published there."""


class SceneError(DataError):
    """A scene of the batch cannot be segmented; the other scenes go on."""


class UnreadableScene(SceneError):
    """The scene is missing, or not a raster or slide its readers can open, or cannot be checksummed."""


class UnreachableObject(UnreadableScene):
    """A remote scene cannot be read: no credentials, access denied, no such object, or the store did not
    answer within the bounded retries."""


class UnsafeSceneId(SceneError):
    """The scene's id (its file stem) cannot name a folder under ``--out`` (empty, ``..``, a separator)."""


class SceneIdTaken(SceneError):
    """The scene's id holds, in ``--out``, the outputs of another source or another checkpoint: they are
    not replaced unless the run is told to (``--replace``)."""


class SceneRefused(SceneError):
    """Preflight refused the scene against the checkpoint: one line per problem, each naming the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ResolutionMismatch(SceneRefused):
    """Preflight refused the scene for its pixel size (or µm/px) alone: too far from the model's."""


class OutOfSpace(SceneError):
    """The scene cannot fit the free space under ``--out``: refused before it is staged."""


class OutsideOutputFolder(SceneError):
    """A write would land outside ``--out`` (a symlinked scene or work folder): nothing is written."""


class ClusterError(DeepLabError):
    """The compute cluster cannot run the work: no node takes it, a node cannot see the files, or the
    cluster refused this client."""


class ServerError(ConfigError):
    """The local Prefect server or one of its processes failed to start or stopped."""
