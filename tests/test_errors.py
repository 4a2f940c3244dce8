"""The errors users meet are named classes under one base with its exit code (deeplab_common/errors.py): a
scene's own problem fails that scene alone, the others stop the run, and a busy folder exits 3."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from deeplab_common import errors
from deeplab_common.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeepLabError,
    OutputBusy,
    ResolutionMismatch,
    SceneError,
    SceneRefused,
)

CLASSES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if cls.__module__ == errors.__name__]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_has_its_code_and_says_what_it_is(cls: type[DeepLabError]) -> None:
    assert issubclass(cls, DeepLabError) and cls.__doc__
    assert cls.exit_code == (3 if cls is OutputBusy else 2)


def test_scene_problems_are_data_errors_and_nothing_else_is() -> None:
    """The driver fails a scene for any exception; the Prefect runner retries all but these, so a scene's
    own problem must never look like a transient one."""
    scene_errors = {cls for cls in CLASSES if issubclass(cls, SceneError)}
    assert {"UnreadableScene", "UnsafeSceneId", "SceneRefused", "ResolutionMismatch", "OutOfSpace"} <= {
        cls.__name__ for cls in scene_errors
    }
    assert all(issubclass(cls, DataError) for cls in scene_errors)
    assert not any(issubclass(cls, SceneError) for cls in (ConfigError, CheckpointError, OutputBusy))


def test_a_refusal_keeps_its_lines() -> None:
    refused = ResolutionMismatch(["a.tif: pixel size 30 m is 402x coarser than the model's 0.0746 m"])
    assert isinstance(refused, SceneRefused) and refused.problems == [str(refused)]


def test_the_bottom_layer_imports_nothing_of_the_project() -> None:
    """In a fresh interpreter, where nothing else is loaded yet."""
    modules = ", ".join(f"deeplab_common.{name}" for name in ("errors", "atomic", "digest", "version"))
    code = f"import sys, {modules};"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'pipeline', 'flows')))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )
