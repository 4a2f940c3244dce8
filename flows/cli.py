"""The ``deeplab`` console script: the engine's commands (``pipeline.cli``) plus ``deeplab serve``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.settings import DEFAULT_WORK_DIR
from pipeline import cli as engine_cli


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeConfig, serve

    parameters: dict[str, Any] = {}
    for name in ("input", "output", "model"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    if args.options is not None:
        parameters["options"] = json.loads(args.options)
    config = ServeConfig(
        work_dir=args.work_dir,
        host=args.host,
        port=args.port,
        api_url=args.api_url,
        pool=args.pool,
        cron=args.cron,
        timezone=args.timezone,
        ray_address=args.ray_address,
        parameters=parameters,
        concurrency_limit=args.concurrency_limit or None,
        worker=not args.no_worker,
    )
    return serve(config)


def add_flow_commands(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="a local Prefect server (SQLite), the work pool, the deployments of prefect.yaml, a worker",
    )
    serve.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="PREFECT_HOME and logs go here"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=4200)
    serve.add_argument("--api-url", help="use this Prefect server (e.g. http://prefect:4200/api); start none")
    serve.add_argument("--pool", default="deeplab", help="the process work pool")
    serve.add_argument("--cron", help="the nightly schedule (default: prefect.yaml's, 0 2 * * *)")
    serve.add_argument("--timezone", help="the nightly schedule's timezone, e.g. Europe/Berlin (default UTC)")
    serve.add_argument(
        "--ray-address", help="flow runs join this Ray cluster (default: a local one each run)"
    )
    serve.add_argument("--input", help="default input of the deployments (folder, glob)")
    serve.add_argument("--output", help="default output folder of the deployments")
    serve.add_argument("--model", help="default checkpoint of the deployments")
    serve.add_argument("--options", help="default engine options, JSON (as SegmentOptions)")
    serve.add_argument("--concurrency-limit", type=int, default=1, help="flow runs at once (0: no limit)")
    serve.add_argument("--no-worker", action="store_true", help="deploy only; workers run elsewhere")
    serve.set_defaults(handler=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    return engine_cli.main(argv, engine_cli.build_parser(add_flow_commands))


if __name__ == "__main__":
    sys.exit(main())
