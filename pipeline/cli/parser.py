"""`deeplab ...`: the parser of every engine command, and their errors as one line and an exit code (0 done,
1 a scene failed, 2 a usage error, 3 the output folder is busy and --no-wait was given)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from deeplab_common.errors import DeepLabError
from deeplab_common.signals import TERMINATED_EXIT, terminate_as_interrupt, was_terminated
from pipeline.cli.console import console
from pipeline.cli.evaluation import add_evaluate_command
from pipeline.cli.flags import flag_of
from pipeline.cli.segment import add_segment_command
from pipeline.cli.training import add_model_commands
from pipeline.cli.tuning import add_tuning_commands

Handler = Callable[[argparse.Namespace], int]


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The ``deeplab`` parser; ``extend`` adds commands of the layers above (``flows`` adds ``serve``)."""
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLab segmentation of large images")
    commands = parser.add_subparsers(dest="command", required=True)

    add_model_commands(commands)
    add_evaluate_command(commands)
    add_tuning_commands(commands)
    add_segment_command(commands)
    if extend is not None:
        extend(commands)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["deeplab", *argv])
    handler: Handler = args.handler
    terminate_as_interrupt()
    try:
        return handler(args)
    except DeepLabError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except ValidationError as exc:  # an option out of range: one line per problem, named as typed
        for problem in exc.errors():
            said = problem["msg"].removeprefix("Value error, ")
            named = f"{flag_of(str(problem['loc'][0]))}: " if problem["loc"] else ""  # a check of several
            console.print(f"[red]error:[/red] {named}{said}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        if was_terminated():
            console.print("terminated (SIGTERM): stopped; a re-run resumes", highlight=False)
            return TERMINATED_EXIT
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
