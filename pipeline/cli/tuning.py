"""`deeplab tune-crf`, `tune-tiling`: measure a checkpoint and store what it should run with."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.metadata import FUSE_CHOICES, TTA_CHOICES
from pipeline.cli.console import console


def scales_asked(asked: list[float] | None) -> tuple[float, ...] | None:
    return tuple(asked) if asked else None


def _scale_set(text: str) -> tuple[float, ...]:
    """``0.75,1`` -> (0.75, 1.0): one candidate set of multi-scale inputs."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of scales: {text!r}") from None


def evaluation_tiling(args: argparse.Namespace, metadata: Any) -> Any:
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
    pairs = find_pairs(args.images, args.masks, loaded)
    miou_classes = metric_classes(loaded, excluded_classes(args))
    if args.verdict_only:
        return _crf_verdict_only(args, loaded, pairs, miou_classes)
    if bool(args.verdict_images) != bool(args.verdict_masks):
        raise ConfigError("--verdict-images and --verdict-masks go together")
    if args.verdict_images:
        search, held = pairs, find_pairs(args.verdict_images, args.verdict_masks, loaded)
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


def excluded_classes(args: argparse.Namespace) -> list[str]:
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
    pairs = find_pairs(args.images, args.masks, loaded)
    exclude = excluded_classes(args)
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


def progress_bar(total: int, label: str) -> Any:
    from contextlib import contextmanager

    from rich.progress import Progress

    @contextmanager
    def bar() -> Iterator[tuple[Progress, Any]]:
        with Progress(console=console) as progress:
            yield progress, progress.add_task(label, total=total)

    return bar()


def add_tuning_commands(commands: Any) -> None:
    """The commands that tune a checkpoint's CRF, tiling, scales and views."""
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
