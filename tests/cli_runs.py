"""The CLI run as a user runs it, for the tests of what it refuses: in this process
(``pipeline.cli.parser.main``, what the ``deeplab`` entry point calls, with its output captured: an
exception that escapes the CLI's handling fails the test with its traceback) or through the real entry point
in a process of its own; and the check that a refusal is one line naming what is at fault."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

# the `deeplab` entry point: the engine's commands and the flows'
DEEPLAB = [sys.executable, "-m", "flows.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``deeplab ARGS`` in this process, from ``cwd``: its exit code and what it printed."""
    from pipeline.cli.parser import main

    out, err, before = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse's usage errors
                code = int(exit.code or 0)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["deeplab", *args], code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``deeplab ARGS`` through the real entry point, in a process of its own."""
    return subprocess.run([*DEEPLAB, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=None)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "failed:"))]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
