"""The project's exception types: each message is meant for a person and names the file at fault."""

from __future__ import annotations


class DeepLabError(Exception):
    """Base class: the CLI prints these as one line and exits with ``exit_code``."""

    exit_code = 2  # a usage error: nothing ran


class OutputBusy(DeepLabError):
    """Another run is writing into the output folder, and this one was told not to wait (``--no-wait``)."""

    exit_code = 3


class CheckpointError(DeepLabError):
    """A checkpoint is missing, unsafe, corrupt or does not match what it is used with."""


class DataError(DeepLabError):
    """An image, mask or listing is unreadable or inconsistent."""


class ConfigError(DeepLabError):
    """An option or combination of options is invalid."""
