"""`deeplab segment`: the batch driver over the scenes given, with the engine's options as flags; and
`deeplab warp`, which puts a scene on a projected grid first, and `deeplab fetch-demo`, which fetches the
demo's inputs where ../shared/data is absent."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cli.console import console, table_console
from pipeline.cli.flags import add_option_flags, add_search_flags, options_from_args, search_from_args
from pipeline.io.sources import as_source


def run_inputs(args: argparse.Namespace) -> list[Any]:
    """The scenes given, and the STAC API search when ``--stac-url`` is; at least one of them."""
    from deeplab_common.errors import ConfigError

    search = search_from_args(args)
    inputs: list[Any] = list(args.scenes) + ([search] if search is not None else [])
    if not inputs:
        raise ConfigError("no input: give scenes (files, folders, globs, URLs, STAC files) or --stac-url")
    return inputs


def _cmd_segment(args: argparse.Namespace) -> int:
    """The batch driver on the scenes given: 0 when every scene is published or unchanged, 1 when any
    failed (each failure is one line naming its file)."""
    from pipeline.cli.progress import ConsoleProgress
    from pipeline.engine.driver import run_batch

    options = options_from_args(args)
    inputs = run_inputs(args)
    if args.dry_run:
        return _dry_run(inputs, args.model, args.out, options)
    batch = run_batch(inputs, args.model, args.out, options, ConsoleProgress(console))
    where = str(args.out).rstrip("/")  # a bucket's scenes are named where they are published
    reported: set[str] = set()
    for record in batch.records:
        result = batch.results.get(record.source)
        if record.outcome == "failed":
            if record.message not in reported:  # one line for the scenes of one id clash
                console.print(f"[red]failed:[/red] {record.message}", highlight=False, soft_wrap=True)
            reported.add(record.message)
        elif result is None:
            console.print(f"{record.source}: {record.message}, skipped", highlight=False, soft_wrap=True)
        else:
            tiles, files = result.report.tiles, ", ".join(result.report.outputs.values())
            console.print(
                f"{record.source}: {where}/{result.folder.name}/ {files} ({tiles.computed} tiles computed, "
                f"{tiles.skipped} skipped, {tiles.resumed} resumed; {result.report.total_seconds:.1f} s)",
                soft_wrap=True,
                highlight=False,
            )
    return batch.exit_code


def _dry_run(scenes: list[Any], model: Path, out: Path, options: Any) -> int:
    """Print each scene's plan (preflight, grid, cores, halo, CRF) as the driver's discovery and preflight
    find it; compute and write nothing."""
    from pipeline.engine.driver import Batch
    from pipeline.engine.manifest import SceneRecord
    from pipeline.engine.plan import count_nodata_cores
    from pipeline.engine.run_checks import check_run

    failures = 0
    refusals: set[str] = set()
    info = check_run(scenes, model, out, options, dry_run=True)
    for planned in Batch(out, info, options).plan(scenes):
        if isinstance(planned, SceneRecord) and planned.outcome == "skipped":
            console.print(
                f"{planned.source}: {planned.message}: a run would skip it", highlight=False, soft_wrap=True
            )
            continue
        if isinstance(planned, SceneRecord):
            failures += 1
            if planned.message not in refusals:  # one line for the scenes of one id clash
                console.print(f"[red]refused:[/red] {planned.message}", highlight=False, soft_wrap=True)
            refusals.add(planned.message)
            continue
        lines = planned.plan.describe(count_nodata_cores(planned.scene, planned.plan))
        for line in lines:
            table_console().print(line, highlight=False, soft_wrap=True)
    return 1 if failures else 0


def add_segment_command(commands: Any) -> None:
    """`segment`: scenes, model, output folder, every SegmentOptions field as a flag, --dry-run."""
    segment = commands.add_parser(
        "segment",
        help="segment scenes and slides (files, folders, globs, URLs, bucket prefixes, STAC) into masks",
    )
    segment.add_argument(
        "scenes",
        nargs="*",
        type=as_source,
        help="scenes: files, folders, globs, URLs (s3://, gs://, az://, https://, /vsis3/...), bucket "
        "prefixes (s3://bucket/incoming/) and globs (s3://bucket/**/*.tif), STAC Items, ItemCollections and "
        "catalogs (.json files or URLs); slides too",
    )
    segment.add_argument("--model", type=Path, required=True)
    segment.add_argument(
        "--out",
        type=as_source,
        required=True,
        help="output folder, or a bucket prefix (s3://bucket/prefix, gs://, az://) built in --scratch",
    )
    add_option_flags(segment)
    add_search_flags(segment)
    segment.add_argument("--dry-run", action="store_true", help="print the plan of each scene and stop")
    segment.set_defaults(handler=_cmd_segment)

    warp = commands.add_parser(
        "warp", help="warp a scene onto another CRS (e.g. its UTM zone), with a nodata mask for the collar"
    )
    warp.add_argument("scene", type=Path)
    warp.add_argument("--crs", required=True, help="the target CRS: EPSG:32636, a WKT or PROJ string")
    warp.add_argument("--out", type=Path, required=True, help="the GeoTIFF to write")
    warp.set_defaults(handler=_cmd_warp)

    fetch = commands.add_parser(
        "fetch-demo",
        help="fetch the demo inputs from their public origins (sha256-pinned), assemble the Kampala scene",
    )
    fetch.add_argument("target", type=Path, help="folder to lay them out in, as ../shared/data is")
    fetch.add_argument(
        "--mirror", help="fetch <mirror>/<origin name>/<file> instead of each file's public origin"
    )
    fetch.set_defaults(handler=_cmd_fetch_demo)


def _cmd_fetch_demo(args: argparse.Namespace) -> int:
    from pipeline.tools.fetch_demo import fetch_demo

    for path in fetch_demo(args.target, args.mirror, progress=console.is_terminal):
        console.print(f"ready: {path}", highlight=False, soft_wrap=True)
    return 0


def _cmd_warp(args: argparse.Namespace) -> int:
    from pipeline.tools.warp_scene import warp_scene

    out = warp_scene(args.scene, args.crs, args.out)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
    return 0
