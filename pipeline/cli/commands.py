"""`deeplab ...`: the command line. Project errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from models.errors import DeepLabError
from models.metadata import FUSE_CHOICES, TTA_CHOICES, TTA_PHRASES
from pipeline.cli.flags import add_option_flags, options_from_args
from pipeline.io.sources import as_source

console = Console(stderr=True)


def _stdout() -> Console:
    """Tables for stdout; wide when piped so that names are never wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=200)


Handler = Callable[[argparse.Namespace], int]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _bbox(text: str) -> tuple[float, float, float, float]:
    values = _floats(text)
    if len(values) != 4:
        raise argparse.ArgumentTypeError("expected minx,miny,maxx,maxy")
    return (values[0], values[1], values[2], values[3])


def _cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ARCHITECTURES

    table = Table(title="DeepLab model family")
    for column in ("architecture", "description", "default output stride"):
        table.add_column(column)
    for arch in ARCHITECTURES.values():
        table.add_row(arch.name, arch.description, str(arch.default_output_stride))
    _stdout().print(table)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from models.checkpoint import file_sha256, read_metadata

    metadata = read_metadata(args.checkpoint)
    document = {"sha256": file_sha256(args.checkpoint), **metadata.model_dump(mode="json")}
    if not args.full:
        document["metrics"] = {k: v for k, v in metadata.metrics.items() if k != "history"}
    print(json.dumps(document, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from models.data import pairs_from_csv, pairs_from_folders, split_pairs
    from models.train import TrainConfig, train

    if args.csv:
        pairs = pairs_from_csv(args.csv)
    elif args.images and args.masks:
        pairs = pairs_from_folders(args.images, args.masks)
    else:
        raise DeepLabError("give --csv FILE, or --images and --masks")
    train_pairs, val_pairs = split_pairs(pairs, args.val_list, args.val_pattern, args.val_bbox)
    colors = None
    if args.colors:
        colors = [
            tuple(int(c[i : i + 2], 16) for i in (0, 2, 4)) for c in args.colors.lstrip("#").split(",#")
        ]
    config = TrainConfig(
        architecture=args.arch,
        pretrained=args.pretrained,
        output_stride=args.output_stride,
        classes=args.classes.split(","),
        colors=colors,
        ignore_index=args.ignore_index,
        class_weights=(
            "auto"
            if args.class_weights == "auto"
            else _floats(args.class_weights)
            if args.class_weights
            else None
        ),
        crop_size=args.crop_size,
        scale_range=tuple(args.scale_range),
        colour_jitter=args.colour_jitter,
        batch_size=args.batch_size,
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        amp=not args.no_amp,
        half=not args.fp32,
        val_every=args.val_every,
        pixel_size_m=args.pixel_size,
        init_from=str(args.init_from) if args.init_from else None,
    )
    description = {
        "source": str(args.csv or args.images),
        "masks": str(args.masks) if args.masks else None,
        "train_images": len(train_pairs),
        "val_images": len(val_pairs),
        "val_stems": [p.stem for p in val_pairs],
        "split": {
            "val_list": str(args.val_list) if args.val_list else None,
            "val_pattern": args.val_pattern,
            "val_bbox": args.val_bbox,
        },
    }
    console.print(f"training {args.arch} on {len(train_pairs)} pairs, validating on {len(val_pairs)}")
    metadata = train(
        config,
        train_pairs,
        val_pairs,
        args.out,
        description,
        console,
        stop_after=args.stop_after,
        command=args.command_line,
    )
    console.print(
        f"wrote {args.out} (val mIoU {metadata.metrics.get('val', {}).get('miou', float('nan')):.4f})"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from models.atomic import write_text_atomically
    from models.checkpoint import load_checkpoint, update_metadata
    from models.errors import ConfigError
    from pipeline.tools.evaluate import evaluate, find_pairs

    loaded = load_checkpoint(args.model)
    tiling = _evaluation_tiling(args, loaded.metadata)
    if args.save_tta and args.tta is None:
        raise ConfigError(f"--save-tta needs the views to save: --tta {'|'.join(TTA_CHOICES)}")
    if args.save_scales and args.scales is None:
        raise ConfigError("--save-scales needs the scales to save: --scales S [S ...] (and --fuse)")
    multiscale = loaded.metadata.multiscale(_scales(args.scales), args.fuse)
    pairs = find_pairs(args.images, args.masks)
    exclude = args.exclude_classes.split(",") if args.exclude_classes else []
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
        )
    _stdout().print(_metrics_table(report, [c.name for c in loaded.metadata.classes]))
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
    from models.errors import ConfigError
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
    from models.checkpoint import load_checkpoint, update_metadata
    from models.metadata import CRFParams
    from pipeline.tools.evaluate import find_pairs, metric_classes
    from pipeline.tools.tune_crf import Trial, tune

    loaded = load_checkpoint(args.model)
    pairs = find_pairs(args.images, args.masks)
    exclude = args.exclude_classes.split(",") if args.exclude_classes else []
    miou_classes = metric_classes(loaded, exclude)

    def show(trial: Trial) -> None:
        params = trial.params
        console.print(
            f"w1={params.w1:g} σα={params.sigma_alpha:g} σβ={params.sigma_beta:g}: "
            f"mIoU {trial.miou:.4f}, boundary F1 {trial.boundary_f1:.4f}"
        )

    result = tune(
        loaded,
        pairs,
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
    if not args.dry_run:
        update_metadata(
            args.model, crf=best, crf_tuning=result | {"image_glob": args.images, "mask_glob": args.masks}
        )
        console.print(f"wrote the tuned CRF parameters into {args.model}")
    return 0


def _cmd_tune_tiling(args: argparse.Namespace) -> int:
    from models.checkpoint import load_checkpoint, update_metadata
    from models.metadata import InputScales, Tiling
    from pipeline.tools.evaluate import find_pairs, metric_classes
    from pipeline.tools.tune_tiling import TilingTrial, tune_tiling

    loaded = load_checkpoint(args.model)
    pairs = find_pairs(args.images, args.masks)
    exclude = args.exclude_classes.split(",") if args.exclude_classes else []
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


def _cmd_segment(args: argparse.Namespace) -> int:
    """The batch driver on the scenes given: 0 when every scene is published or unchanged, 1 when any
    failed (each failure is one line naming its file)."""
    from pipeline.cli.progress import ConsoleProgress
    from pipeline.engine.driver import run_batch

    options = options_from_args(args)
    if args.dry_run:
        return _dry_run(args.scenes, args.model, args.out, options)
    batch = run_batch(args.scenes, args.model, args.out, options, ConsoleProgress(console))
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
            tiles, files = result.details.tiles, ", ".join(result.details.outputs.values())
            console.print(
                f"{record.source}: {result.mask.parent}/ {files} ({tiles.computed} tiles computed, "
                f"{tiles.skipped} skipped, {tiles.resumed} resumed; {result.details.total_seconds:.1f} s)",
                soft_wrap=True,
                highlight=False,
            )
    return batch.exit_code


def _dry_run(scenes: list[Any], model: Path, out: Path, options: Any) -> int:
    """Print each scene's plan (preflight, grid, cores, halo, CRF); compute and write nothing."""
    from models.checkpoint import checkpoint_info
    from pipeline.engine.driver import failure_line
    from pipeline.engine.plan import count_nodata_cores, plan_scene
    from pipeline.io.discover import discover_scenes, duplicate_ids
    from pipeline.io.readers import describe

    metadata = checkpoint_info(Path(model)).metadata
    found = discover_scenes([str(scene) for scene in scenes], exclude=Path(out).resolve())
    clashes = duplicate_ids(found)
    for line in dict.fromkeys(clashes.values()):
        console.print(f"[red]refused:[/red] {line}", highlight=False, soft_wrap=True)
    failures = len(clashes)
    for scene in (scene for scene in found if scene not in clashes):
        try:
            plan = plan_scene(describe(scene, options.mpp), metadata, options)
            lines = plan.describe(count_nodata_cores(plan.check.scene, plan))
        except Exception as error:
            failures += 1
            console.print(f"[red]refused:[/red] {failure_line(scene, 'preflight', error)}", soft_wrap=True)
            continue
        for line in lines:
            _stdout().print(line, highlight=False, soft_wrap=True)
    return 1 if failures else 0


def _cmd_slide_chips(args: argparse.Namespace) -> int:
    from pipeline.tools.slide_chips import cut_chips

    summary = cut_chips(args.slide, args.out, args.size, args.stride, args.min_tissue, args.holdout_from)
    shares = ", ".join(
        f"{n} {v:.1%}" for n, v in zip(("glass", "stroma", "nuclei"), summary.class_share, strict=True)
    )
    console.print(
        f"{args.out}: {summary.train} training and {summary.val} held-out chips (classical stain labels: "
        f"nuclei at haematoxylin OD > {summary.nuclei_threshold:.3f}; slide: {shares})",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _cmd_import_torchvision(args: argparse.Namespace) -> int:
    from models.torchvision_import import import_torchvision_state_dict

    metadata = import_torchvision_state_dict(args.state_dict, args.arch, args.classes.split(","), args.out)
    console.print(f"wrote {args.out} ({metadata.architecture}, {metadata.num_classes} classes)")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from models.atomic import write_text_atomically
    from models.card import render_card

    attribution = args.attribution.read_text() if args.attribution else ""
    text = render_card(args.checkpoint, attribution)
    if args.out:
        write_text_atomically(args.out, text)
        console.print(f"wrote {args.out}")
    else:
        print(text)
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


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The ``deeplab`` parser; ``extend`` adds commands of the layers above (``flows`` adds ``serve``)."""
    parser = argparse.ArgumentParser(prog="deeplab", description="DeepLab segmentation of large images")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="list the model family").set_defaults(handler=_cmd_models)

    info = commands.add_parser("info", help="print a checkpoint's metadata")
    info.add_argument("checkpoint", type=Path)
    info.add_argument("--full", action="store_true", help="include the training history")
    info.set_defaults(handler=_cmd_info)

    train = commands.add_parser("train", help="train a model on image/mask pairs")
    source = train.add_argument_group("data")
    source.add_argument("--images", help="folder or glob of images (GeoTIFF, PNG, JPEG)")
    source.add_argument("--masks", help="folder or glob of masks, paired with images by file stem")
    source.add_argument("--csv", type=Path, help="CSV whose first two columns are image and mask paths")
    source.add_argument("--val-list", type=Path, help="file of stems (or names) that form the validation set")
    source.add_argument("--val-pattern", action="append", help="glob on stems for the validation set")
    source.add_argument("--val-bbox", type=_bbox, help="validation = chips centred in minx,miny,maxx,maxy")
    train.add_argument("--classes", required=True, help="comma-separated class names, in id order")
    train.add_argument("--colors", help="comma-separated #rrggbb colours, one per class")
    train.add_argument("--ignore-index", type=int, default=255)
    train.add_argument("--class-weights", help="comma-separated weights, or 'auto' (median frequency)")
    train.add_argument("--arch", default="deeplabv3plus_efficientnet_lite0")
    train.add_argument("--pretrained", choices=["none", "imagenet"], default="imagenet")
    train.add_argument("--output-stride", type=int, choices=[8, 16])
    train.add_argument("--crop-size", type=int, default=256)
    train.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=[0.75, 1.25],
        metavar=("LOW", "HIGH"),
        help="random scaling of each crop (the DeepLab papers use 0.5 2.0)",
    )
    train.add_argument("--colour-jitter", type=float, default=0.2, help="brightness/contrast jitter")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    train.add_argument("--lr", type=float, default=0.01)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    train.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    train.add_argument("--val-every", type=int, default=1)
    train.add_argument("--pixel-size", type=float, help="training pixel size in metres (default: from data)")
    train.add_argument("--init-from", type=Path, help="fine-tune from this checkpoint's weights")
    train.add_argument("--stop-after", type=int, help="end this run after N epochs (run again to resume)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="mIoU, per-class IoU, boundary F1 with and without CRF")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--images", required=True, help="folder or glob of images")
    evaluate.add_argument("--masks", required=True, help="folder or glob of masks (paired by stem)")
    evaluate.add_argument("--crf", action="store_true", help="also evaluate with the dense CRF")
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

    segment = commands.add_parser("segment", help="segment georeferenced scenes into class-mask COGs")
    segment.add_argument(
        "scenes",
        nargs="+",
        type=as_source,
        help="scenes: files, folders, globs, or URLs GDAL reads (s3://, https://); slides too",
    )
    segment.add_argument("--model", type=Path, required=True)
    segment.add_argument("--out", type=Path, required=True)
    add_option_flags(segment)
    segment.add_argument("--dry-run", action="store_true", help="print the plan of each scene and stop")
    segment.set_defaults(handler=_cmd_segment)

    chips = commands.add_parser(
        "slide-chips", help="cut a slide into PNG training chips labelled by classical stain separation"
    )
    chips.add_argument("slide", type=Path)
    chips.add_argument("--out", type=Path, required=True, help="writes images/ and masks/ here")
    chips.add_argument("--size", type=int, default=256)
    chips.add_argument("--stride", type=int, default=128)
    chips.add_argument("--min-tissue", type=float, default=0.1, help="share of tissue a chip needs")
    chips.add_argument(
        "--holdout-from", type=float, default=0.75, help="chips below this share of the height: '-val-'"
    )
    chips.set_defaults(handler=_cmd_slide_chips)

    card = commands.add_parser("card", help="render a model card (markdown) from a checkpoint's metadata")
    card.add_argument("checkpoint", type=Path)
    card.add_argument("--attribution", type=Path, help="markdown describing the data and its licence")
    card.add_argument("--out", type=Path, help="write here instead of stdout")
    card.set_defaults(handler=_cmd_card)

    imp = commands.add_parser(
        "import-torchvision", help="convert a torchvision DeepLab state dict (COCO/VOC) into a checkpoint"
    )
    imp.add_argument(
        "state_dict", type=Path, help="a .pth state dict, read with torch.load(weights_only=True)"
    )
    imp.add_argument(
        "--arch",
        required=True,
        choices=["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"],
    )
    imp.add_argument("--classes", required=True, help="comma-separated class names of its classifier")
    imp.add_argument("--out", type=Path, required=True)
    imp.set_defaults(handler=_cmd_import_torchvision)
    if extend is not None:
        extend(commands)
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["deeplab", *argv])
    handler: Handler = args.handler
    try:
        return handler(args)
    except DeepLabError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except ValidationError as exc:  # an option out of range: one line per problem, named as typed
        for problem in exc.errors():
            option = "--" + str(problem["loc"][0]).replace("_", "-")
            console.print(f"[red]error:[/red] {option}: {problem['msg']}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
