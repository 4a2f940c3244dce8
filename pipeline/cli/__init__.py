"""The ``deeplab`` command line: thin over the engine, its flags generated from the options object."""

from pipeline.cli.console import console
from pipeline.cli.parser import build_parser, main

__all__ = ["build_parser", "console", "main"]
