"""`deeplab evaluate`: a checkpoint, or a mask a run published, scored against image/mask pairs, vector labels
over scenes or QuPath annotations over slides: per-class IoU, boundary F1, object F1, with and without the
CRF."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from models.metadata import FUSE_CHOICES, TTA_CHOICES, TTA_PHRASES
from pipeline.cli.console import console, table_console
from pipeline.cli.label_flags import add_label_flags, bbox, names, scene_spec
from pipeline.cli.tuning import evaluation_tiling, excluded_classes, progress_bar, scales_asked
from pipeline.crf import BACKEND_NAMES, CPU_DEFAULT


def _evaluation_images(args: argparse.Namespace, loaded: Any) -> list[Any]:
    """Scenes with vector labels (one region each), or image/mask pairs."""
    from deeplab_common.errors import ConfigError
    from models.scene_training import evaluation_blocks
    from pipeline.tools.evaluate import find_pairs

    metadata = loaded.metadata
    if args.scenes or args.slides:
        from pipeline.tools.slide_training import slide_evaluation_blocks

        classes = [c.name for c in metadata.classes]
        background = next((c.name for c in metadata.classes if c.role == "background"), classes[0])
        args.ignore_index = metadata.ignore_index
        spec = scene_spec(args, classes, background, metadata.pixel_size_m)
        if args.slides:
            labels, blocks = slide_evaluation_blocks(spec, tuple(args.slides))
        else:
            labels, blocks = evaluation_blocks(spec)
        for line in (line for label in labels for line in label.lines):
            console.print(line, highlight=False, soft_wrap=True)
        return list(blocks)
    if args.labels:
        raise ConfigError("--labels goes with --scenes or --slides (a model's predictions), or --mask")
    if not (args.images and args.masks):
        raise ConfigError("give --images and --masks, --scenes and --labels, or --mask and --labels")
    return find_pairs(args.images, args.masks, loaded)


def _cmd_evaluate_mask(args: argparse.Namespace) -> int:
    """--mask M --labels L: what a run already published, against vector labels."""
    from deeplab_common.atomic import write_text_atomically
    from pipeline.tools.evaluate import evaluate_mask

    report = evaluate_mask(
        args.mask,
        lambda classes, background, ignore: scene_spec(
            argparse.Namespace(**{**vars(args), "scenes": [args.mask], "ignore_index": ignore}),
            classes,
            background,
            None,
        ),
        None if args.objects is None else names(args.objects),
    )
    classes = list(report["mask"]["per_class_iou"])
    table_console().print(_metrics_table(report, classes))
    if args.report:
        write_text_atomically(args.report, json.dumps(report, indent=2))
        console.print(f"wrote {args.report}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deeplab_common.atomic import write_text_atomically
    from deeplab_common.errors import ConfigError
    from models.checkpoint import load_checkpoint, update_metadata
    from pipeline.tools.evaluate import evaluate

    if args.mask:
        return _cmd_evaluate_mask(args)
    if args.model is None:
        raise ConfigError("--model: give the checkpoint to evaluate (or --mask to score a published mask)")
    loaded = load_checkpoint(args.model)
    tiling = evaluation_tiling(args, loaded.metadata)
    if args.save_tta and args.tta is None:
        raise ConfigError(f"--save-tta needs the views to save: --tta {'|'.join(TTA_CHOICES)}")
    if args.save_scales and args.scales is None:
        raise ConfigError("--save-scales needs the scales to save: --scales S [S ...] (and --fuse)")
    multiscale = loaded.metadata.multiscale(scales_asked(args.scales), args.fuse)
    images = _evaluation_images(args, loaded)
    exclude = excluded_classes(args)
    with progress_bar(len(images), "evaluate") as (progress, task):
        report = evaluate(
            loaded,
            images,
            args.crf,
            exclude_classes=exclude,
            on_image=lambda stem: progress.advance(task),
            multiscale=multiscale,
            tiling=tiling,
            tta=args.tta,  # None: the checkpoint's
            crf_backend=args.crf_backend,
            object_classes=None if args.objects is None else names(args.objects),
        )
    table_console().print(_metrics_table(report, [c.name for c in loaded.metadata.classes]))
    if args.report:
        write_text_atomically(args.report, json.dumps(report, indent=2))
        console.print(f"wrote {args.report}")
    changes: dict[str, Any] = {}
    if args.record_as:
        metrics = dict(loaded.metadata.metrics)
        source = (
            {"images": args.images, "masks": args.masks}
            if args.images
            else {"scenes": [str(p) for p in args.scenes or args.slides]}
        )
        metrics[args.record_as] = {**source, "labels": args.labels, "excluded": exclude, **report}
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
    objects = sorted({name for part in report.values() for name in part.get("objects", {})})
    for name in objects:
        scores = [part.get("objects", {}).get(name) for part in report.values()]
        for label, key in (
            ("object F1", "f1"),
            ("object precision", "precision"),
            ("object recall", "recall"),
        ):
            table.add_row(f"{label} {name}", *("-" if v is None else f"{v[key]:.4f}" for v in scores))
    table.add_row("images", *(str(part["images"]) for part in report.values()))
    return table


def add_evaluate_command(commands: Any) -> None:
    """`deeplab evaluate`."""
    evaluate = commands.add_parser("evaluate", help="mIoU, per-class IoU, boundary F1 with and without CRF")
    evaluate.add_argument("--model", type=Path, help="the checkpoint (not with --mask)")
    evaluate.add_argument("--images", help="folder or glob of images")
    evaluate.add_argument("--masks", help="folder or glob of masks (paired by stem)")
    evaluate.add_argument(
        "--mask", type=Path, help="a published mask.tif to score against --labels (no model is run)"
    )
    add_label_flags(evaluate.add_argument_group("vector labels (with --scenes or --mask)"))
    evaluate.add_argument(
        "--val-bbox", type=bbox, help="score only the part of each scene inside minx,miny,maxx,maxy"
    )
    evaluate.add_argument(
        "--objects",
        help="classes scored by object F1 (SpaceNet's, IoU > 0.5), comma-separated; default: the "
        "small-object classes",
    )
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
