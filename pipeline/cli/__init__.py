"""The ``deeplab`` command line: thin over the engine, its flags generated from the options object."""

from pipeline.cli.commands import build_parser, console, main

__all__ = ["build_parser", "console", "main"]
