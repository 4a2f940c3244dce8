"""The command line's consoles: messages and progress on stderr, tables on stdout."""

from __future__ import annotations

import sys

from rich.console import Console

console = Console(stderr=True)


def table_console() -> Console:
    """Tables for stdout; wide when piped so that names are never wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=200)
