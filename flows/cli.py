"""The ``deeplab`` console script: the engine's commands (``pipeline.cli``) plus ``serve``, ``run-flow``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.settings import DEFAULT_WORK_DIR
from pipeline.cli import build_parser, console
from pipeline.cli import main as engine_main
from pipeline.cli.flags import add_option_flags, add_search_flags, options_from_args, search_from_args
from pipeline.engine.manifest import MANIFEST_NAME
from pipeline.engine.options import SegmentOptions
from pipeline.engine.outputs import output_for
from pipeline.engine.run_checks import check_run
from pipeline.io.sources import as_source
from pipeline.io.stac_input import StacSearch


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import ServeConfig, serve

    parameters: dict[str, Any] = {}
    for name in ("input", "output", "model"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    if args.options is not None:
        # validated now, not when the first run starts: a wrong name or value is a usage error
        options = SegmentOptions.model_validate_json(args.options)
        parameters["options"] = options.model_dump(mode="json", exclude_unset=True)
    if args.search is not None:  # validated now too; a relative datetime (P1D) is made absolute each run
        parameters["search"] = StacSearch.model_validate_json(args.search).model_dump(
            mode="json", exclude_none=True
        )
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


def _cmd_run_flow(args: argparse.Namespace) -> int:
    """The segment-scenes flow, in this process, on a Prefect server (PREFECT_API_URL, else a local one)."""
    from flows.serve import ServeConfig, Services, free_port, local_server
    from flows.settings import prefect_environment, prefect_home

    options = options_from_args(args)
    check_run(args.scenes, args.model, args.out, options)  # before any server: a missing model in a second
    api_url = os.environ.get("PREFECT_API_URL")
    config = ServeConfig(work_dir=args.work_dir, port=free_port(), api_url=api_url)
    home = prefect_home(config.work_dir)
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_environment(config.work_dir, config.url)
    services = Services(home)
    try:
        with local_server(config, services, env):
            os.environ.update(env)  # before Prefect reads its settings: this process is a client of it
            from flows.segment_scenes import segment_scenes

            state = segment_scenes(
                [str(p) for p in args.scenes],
                str(args.out),
                str(args.model),
                options,
                search=search_from_args(args),
                return_state=True,
            )
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # the run's last log lines reach the server before it stops
    finally:
        services.stop()
    manifest = output_for(args.out, options.scratch).folder / MANIFEST_NAME  # a bucket's: its scratch copy
    summary = json.loads(manifest.read_text())["runs"][-1] if state.is_final() and manifest.is_file() else {}
    for scene in summary.get("scenes", []):
        note = f": {scene['message']}" if scene["message"] else ""
        console.print(f"{scene['scene_id']}: {scene['outcome']}{note}", highlight=False, soft_wrap=True)
    console.print(f"flow run {state.name}: {state.message or ''}", highlight=False, soft_wrap=True)
    return 0 if state.is_completed() else 1


def add_flow_commands(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="a local Prefect server (SQLite), the work pool, the deployments of prefect.yaml, a worker",
    )
    serve.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="PREFECT_HOME and logs go here"
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="the Prefect server's address (default: loopback only); any other needs "
        "PREFECT_SERVER_API_AUTH_STRING=user:password set, the server then requires it",
    )
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
    serve.add_argument(
        "--options",
        help="default engine options of the deployments, JSON with the option names of `deeplab segment`, "
        'e.g. \'{"tile": 256, "crf": false}\'',
    )
    serve.add_argument(
        "--search",
        help="a STAC API search as the deployments' input, JSON with the fields of --stac-* of `deeplab "
        'segment`, e.g. \'{"url": "https://stac.example.org", "collections": ["drone"], "datetime": "P1D"}\'',
    )
    serve.add_argument("--concurrency-limit", type=int, default=1, help="flow runs at once (0: no limit)")
    serve.add_argument("--no-worker", action="store_true", help="deploy only; workers run elsewhere")
    serve.set_defaults(handler=_cmd_serve)

    run = commands.add_parser(
        "run-flow",
        help="run the segment-scenes flow now, here (on PREFECT_API_URL, else a local Prefect server)",
    )
    run.add_argument("scenes", nargs="*", type=as_source, help="as `deeplab segment` takes them")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--out", type=as_source, required=True, help="output folder, or a bucket prefix")
    run.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="PREFECT_HOME and logs go here")
    add_option_flags(run)
    add_search_flags(run)
    run.set_defaults(handler=_cmd_run_flow)


def main(argv: Sequence[str] | None = None) -> int:
    return engine_main(argv, build_parser(add_flow_commands))


if __name__ == "__main__":
    sys.exit(main())
