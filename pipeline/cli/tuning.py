"""`deeplab evaluate`, `tune-crf`, `tune-tiling`: measure a checkpoint and store what it should run with."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.table import Table

from models.metadata import FUSE_CHOICES, TTA_CHOICES, TTA_PHRASES
from pipeline.cli.console import console, table_console
from pipeline.crf import BACKEND_NAMES, CPU_DEFAULT


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deeplab_common.atomic import write_text_atomically
    from deeplab_common.errors import ConfigError
    from models.checkpoint import load_checkpoint, update_metadata
    from pipeline.tools.evaluate import evaluate, find_pairs

    loaded = load_checkpoint(args.model)
    tiling = _evaluation_tiling(args, loaded.metadata)
    if args.save_tta and args.tta is None:
        raise ConfigError(f"--save-tta needs the views to save: --tta {'|'.join(TTA_CHOICES)}")
    if args.save_scales and args.scales is None:
        raise ConfigError("--save-scales needs the scales to save: --scales S [S ...] (and --fuse)")
    multiscale = loaded.metadata.multiscale(_scales(args.scales), args.fuse)
    pairs = find_pairs(args.images, args.masks)
    exclude = _excluded(args)
    with _bar(len(pairs), "evaluate") as (progress, task):
        report = evaluate(
            loaded,
            pairs,
            args.crf,
            exclude_classes=exclude,
            on_image=lambda stem: progress.advance(task),
            multiscale=multiscale,
            tiling=tiling,
            tta=args.tta,  # None: the checkpoint's
            crf_backend=args.crf_backend,
        )
    table_console().print(_metrics_table(report, [c.name for c in loaded.metadata.classes]))
    if args.report:
        write_text_atomically(args.report, json.dumps(report, indent=2))
        console.print(f"wrote {args.report}")
    changes: dict[str, Any] = {}
    if args.record_as:
        metrics = dict(loaded.metadata.metrics)
        metrics[args.record_as] = {"images": args.images, "masks": args.masks, "excluded": exclude, **report}
        changes["metrics"] = metrics
        console.print(f"recording the results in {args.model} as metrics.{args.record_as}")
    if args.save_tiling and tiling is not None:
        changes["tiling"] = tiling
        console.print(f"{args.model}: the engine now cuts scenes for it as evaluated: {tiling.describe()}")
    if args.save_tta:
        changes["tta"] = args.tta
        console.print(
            f"{args.model}: the engine now averages the logits of {TTA_PHRASES[args.tta]}, as evaluated"
        )
    if args.save_scales:
        changes["input_scales"] = multiscale
        console.print(f"{args.model}: the engine now runs it at {multiscale.describe()}, as evaluated")
    if changes:
        update_metadata(args.model, **changes)  # one rewrite of the checkpoint for all
    return 0


def _scales(asked: list[float] | None) -> tuple[float, ...] | None:
    return tuple(asked) if asked else None


def _scale_set(text: str) -> tuple[float, ...]:
    """``0.75,1`` -> (0.75, 1.0): one candidate set of multi-scale inputs."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of scales: {text!r}") from None


def _evaluation_tiling(args: argparse.Namespace, metadata: Any) -> Any:
    """The tiling ``evaluate`` runs the model on: none (whole images) with ``--whole-image``; else the one
    asked for, completed from the checkpoint's; else the checkpoint's (what ``segment`` would use); else
    whole images."""
    from deeplab_common.errors import ConfigError
    from pipeline.engine.grid import resolve_tiling

    asked = args.tile is not None or args.cores_per_window is not None
    if args.whole_image and (asked or args.save_tiling):
        raise ConfigError(
            "--whole-image runs no tiling: it cannot go with --tile, --cores-per-window or --save-tiling"
        )
    if args.save_tiling and not asked:
        raise ConfigError("--save-tiling needs the tiling to save: --tile N (and --cores-per-window N)")
    if args.whole_image or not (asked or metadata.tiling):
        return None
    return resolve_tiling(metadata, args.tile, args.cores_per_window)


def _cmd_tune_crf(args: argparse.Namespace) -> int:
    from deeplab_common.errors import ConfigError
    from models.checkpoint import load_checkpoint, update_metadata
    from models.metadata import CRFParams
    from pipeline.tools.evaluate import find_pairs, metric_classes
    from pipeline.tools.tune_crf import HOLD_OUT_EVERY, Trial, crf_verdict, hold_out, tune

    loaded = load_checkpoint(args.model)
    pairs = find_pairs(args.images, args.masks)
    miou_classes = metric_classes(loaded, _excluded(args))
    if args.verdict_only:
        return _crf_verdict_only(args, loaded, pairs, miou_classes)
    if bool(args.verdict_images) != bool(args.verdict_masks):
        raise ConfigError("--verdict-images and --verdict-masks go together")
    if args.verdict_images:
        search, held = pairs, find_pairs(args.verdict_images, args.verdict_masks)
        source = f"{args.verdict_images} (not used in the search)"
    else:
        if len(pairs) < HOLD_OUT_EVERY:
            raise ConfigError(
                f"{args.images}: {len(pairs)} image(s); the verdict holds out every {HOLD_OUT_EVERY}rd "
                f"image, so give at least {HOLD_OUT_EVERY}, or --verdict-images and --verdict-masks"
            )
        search, held = hold_out(pairs)
        source = f"every {HOLD_OUT_EVERY}rd image of {args.images}, held out of the search"

    def show(trial: Trial) -> None:
        params = trial.params
        console.print(
            f"w1={params.w1:g} σα={params.sigma_alpha:g} σβ={params.sigma_beta:g}: "
            f"mIoU {trial.miou:.4f}, boundary F1 {trial.boundary_f1:.4f}"
        )

    result = tune(
        loaded,
        search,
        objective=args.objective,
        crop=args.crop,
        iterations=args.iterations,
        workers=args.workers,
        miou_classes=miou_classes,
        on_trial=show,
    )
    best = CRFParams.model_validate(result["best"])
    console.print(
        f"best: {best.model_dump()} -> {result['best_score']} (no CRF {result['no_crf']}, "
        f"paper defaults {result['paper_defaults']})"
    )
    verdict = crf_verdict(loaded, held, best, args.crop, miou_classes, source)
    _say_verdict(verdict)
    if not args.dry_run:
        update_metadata(
            args.model,
            crf=best,
            crf_tuning=result | {"image_glob": args.images, "mask_glob": args.masks},
            crf_verdict=verdict,
        )
        console.print(f"wrote the tuned CRF parameters and the verdict into {args.model}")
    return 0


def _crf_verdict_only(
    args: argparse.Namespace, loaded: Any, pairs: list[Any], miou_classes: list[str]
) -> int:
    """--verdict-only: the checkpoint's CRF against none on the given (held-out) images; no search."""
    from models.checkpoint import update_metadata
    from pipeline.tools.tune_crf import crf_verdict

    source = f"{args.images} (held out: --verdict-only)"
    verdict = crf_verdict(loaded, pairs, loaded.metadata.crf, args.crop, miou_classes, source)
    _say_verdict(verdict)
    if not args.dry_run:
        update_metadata(args.model, crf_verdict=verdict)
        console.print(f"wrote the verdict into {args.model}")
    return 0


def _excluded(args: argparse.Namespace) -> list[str]:
    """--exclude-classes as a list of class names."""
    return args.exclude_classes.split(",") if args.exclude_classes else []


def _say_verdict(verdict: Any) -> None:
    outcome = "helps: segment runs it" if verdict.helps else "does not help: segment runs without it"
    console.print(f"verdict: {verdict.describe()}; the CRF {outcome} unless told otherwise")


def _cmd_tune_tiling(args: argparse.Namespace) -> int:
    from models.checkpoint import load_checkpoint, update_metadata
    from models.metadata import InputScales, Tiling
    from pipeline.tools.evaluate import find_pairs, metric_classes
    from pipeline.tools.tune_tiling import TilingTrial, tune_tiling

    loaded = load_checkpoint(args.model)
    pairs = find_pairs(args.images, args.masks)
    exclude = _excluded(args)
    metric_classes(loaded, exclude)  # unknown class names fail before any model pass

    def show(trial: TilingTrial) -> None:
        console.print(f"{trial.describe()}: mIoU {trial.miou:.4f}, boundary F1 {trial.boundary_f1:.4f}")

    multiscales = [InputScales(scales=scales, fuse=args.fuse or "max") for scales in args.scales or ()]
    result = tune_tiling(
        loaded,
        pairs,
        args.tiles,
        args.cores_per_window,
        exclude,
        on_trial=show,
        views=args.tta or (),
        multiscales=multiscales,
    )
    best = Tiling.model_validate(result["best"])
    chosen: dict[str, Any] = {"tiling": best}
    described = best.describe()
    if "best_scales" in result:
        chosen["input_scales"] = InputScales.model_validate(result["best_scales"])
        described += f", {chosen['input_scales'].describe()}"
    if "best_tta" in result:
        chosen["tta"] = result["best_tta"]
        described += f", test-time views {result['best_tta']}"
    console.print(f"best: {described} -> mIoU {result['best_miou']:.4f}")
    if not args.dry_run:
        tuning = result | {"image_glob": args.images, "mask_glob": args.masks, "excluded": exclude}
        update_metadata(args.model, tiling_tuning=tuning, **chosen)
        console.print(
            f"wrote {' and '.join(chosen)} into {args.model}: segment, evaluate and tune-crf now use it"
        )
    return 0


def _bar(total: int, label: str) -> Any:
    from contextlib import contextmanager

    from rich.progress import Progress

    @contextmanager
    def bar() -> Iterator[tuple[Progress, Any]]:
        with Progress(console=console) as progress:
            yield progress, progress.add_task(label, total=total)

    return bar()


def _metrics_table(report: dict[str, Any], classes: list[str]) -> Table:
    table = Table(title="evaluation")
    table.add_column("metric")
    for name in report:
        table.add_column(name.replace("_", " "), justify="right")
    rows = [("mIoU", "miou"), ("pixel accuracy", "pixel_accuracy"), ("boundary F1", "boundary_f1")]
    for label, key in rows:
        table.add_row(label, *(f"{part[key]:.4f}" for part in report.values()))
    for name in classes:
        values = [part["per_class_iou"].get(name) for part in report.values()]
        table.add_row(f"IoU {name}", *("-" if v is None else f"{v:.4f}" for v in values))
    table.add_row("images", *(str(part["images"]) for part in report.values()))
    return table


def add_tuning_commands(commands: Any) -> None:
    """The commands that evaluate a checkpoint and tune its CRF, tiling, scales and views."""
    evaluate = commands.add_parser("evaluate", help="mIoU, per-class IoU, boundary F1 with and without CRF")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--images", required=True, help="folder or glob of images")
    evaluate.add_argument("--masks", required=True, help="folder or glob of masks (paired by stem)")
    evaluate.add_argument("--crf", action="store_true", help="also evaluate with the dense CRF")
    evaluate.add_argument(
        "--crf-backend", choices=BACKEND_NAMES, default=CPU_DEFAULT, help="the CRF's implementation"
    )
    evaluate.add_argument("--exclude-classes", help="comma-separated classes left out of the mIoU")
    evaluate.add_argument("--report", type=Path, help="write the JSON report here")
    evaluate.add_argument(
        "--scales",
        type=float,
        nargs="+",
        help="multi-scale inputs, e.g. 0.75 1 (default: the checkpoint's, else 1 alone)",
    )
    evaluate.add_argument(
        "--fuse",
        choices=FUSE_CHOICES,
        help="how scales are fused: max (the paper's) or mean (default: the checkpoint's, else max)",
    )
    evaluate.add_argument(
        "--save-scales",
        action="store_true",
        help="store --scales and --fuse in the checkpoint: segment then runs them unless told otherwise",
    )
    evaluate.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        help="test-time views averaged: a horizontal flip (2), both flips (4), flips and transposes (8) "
        "(default: the checkpoint's, else none)",
    )
    evaluate.add_argument(
        "--save-tta",
        action="store_true",
        help="store --tta in the checkpoint: segment then averages these views unless told otherwise",
    )
    evaluate.add_argument(
        "--record-as", help="also store the results in the checkpoint's metrics under this name"
    )
    tiling = evaluate.add_argument_group(
        "tiling",
        "run the model on the windows `deeplab segment` cuts (default: the checkpoint's tiling if it records "
        "one, else whole images)",
    )
    tiling.add_argument("--tile", type=int, help="core size in pixels, as segment's --tile")
    tiling.add_argument("--cores-per-window", type=int, help="as segment's --cores-per-window")
    tiling.add_argument("--whole-image", action="store_true", help="each image in one pass, no tiling")
    tiling.add_argument(
        "--save-tiling",
        action="store_true",
        help="store this tiling in the checkpoint: segment then uses it unless told otherwise",
    )
    evaluate.set_defaults(handler=_cmd_evaluate)

    tune_crf = commands.add_parser("tune-crf", help="coarse-to-fine search of the CRF's w1, σα, σβ")
    tune_crf.add_argument("--model", type=Path, required=True)
    tune_crf.add_argument("--images", required=True)
    tune_crf.add_argument("--masks", required=True)
    tune_crf.add_argument("--objective", choices=["miou", "boundary_f1"], default="miou")
    tune_crf.add_argument(
        "--crop", type=int, default=512, help="centre crop per image, bounds the CRF's cost"
    )
    tune_crf.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    tune_crf.add_argument("--workers", type=int, help="CRF processes (default: CPU count, at most 4)")
    tune_crf.add_argument("--exclude-classes", help="comma-separated classes left out of the mIoU")
    tune_crf.add_argument(
        "--verdict-images",
        help="held-out images for the verdict on whether the tuned CRF helps (default: every third image of "
        "--images, kept out of the search)",
    )
    tune_crf.add_argument("--verdict-masks", help="their masks")
    tune_crf.add_argument(
        "--verdict-only",
        action="store_true",
        help="no search: measure the checkpoint's CRF against none on --images (held out) and record that",
    )
    tune_crf.add_argument("--dry-run", action="store_true", help="report, but leave the checkpoint unchanged")
    tune_crf.set_defaults(handler=_cmd_tune_crf)

    tune_tiling = commands.add_parser(
        "tune-tiling", help="the core size segment cuts scenes into for a model, chosen on validation images"
    )
    tune_tiling.add_argument("--model", type=Path, required=True)
    tune_tiling.add_argument("--images", required=True)
    tune_tiling.add_argument("--masks", required=True)
    tune_tiling.add_argument(
        "--tiles", type=int, nargs="+", default=[128, 256, 512], help="candidate core sizes, pixels"
    )
    tune_tiling.add_argument(
        "--cores-per-window", type=int, default=2, help="as segment's --cores-per-window"
    )
    tune_tiling.add_argument("--exclude-classes", help="comma-separated classes left out of the mIoU")
    tune_tiling.add_argument(
        "--tta",
        nargs="+",
        choices=TTA_CHOICES,
        help="also choose the test-time views among these, on the best tiling (ties: fewer model passes); "
        "without it the stored views are left as they are",
    )
    tune_tiling.add_argument(
        "--scales",
        type=_scale_set,
        nargs="+",
        help="also choose the multi-scale inputs among these sets, e.g. 1 0.75,1 (each tried with every "
        "core size; ties: fewer scales); without it the stored scales are left as they are",
    )
    tune_tiling.add_argument("--fuse", choices=FUSE_CHOICES, help="how --scales are fused (default max)")
    tune_tiling.add_argument(
        "--dry-run", action="store_true", help="report, but leave the checkpoint unchanged"
    )
    tune_tiling.set_defaults(handler=_cmd_tune_tiling)
