"""`deeplab models`, `info`, `train`, `slide-chips`, `classes`, `card` and `import-torchvision`: the model
commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from deeplab_common.errors import DeepLabError
from pipeline.cli.console import console, table_console
from pipeline.cli.label_flags import add_label_flags, bbox, names, scene_spec

DEFAULT_ARCHITECTURE = "deeplabv3plus_efficientnet_lite0"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _cmd_models(args: argparse.Namespace) -> int:
    from models.registry import ARCHITECTURES

    table = Table(title="DeepLab model family")
    for column in ("architecture", "description", "default output stride"):
        table.add_column(column)
    for arch in ARCHITECTURES.values():
        table.add_row(arch.name, arch.description, str(arch.default_output_stride))
    table_console().print(table)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from models.checkpoint import file_sha256, read_metadata

    metadata = read_metadata(args.checkpoint)
    document = {"sha256": file_sha256(args.checkpoint), **metadata.model_dump(mode="json")}
    if not args.full:
        document["metrics"] = {k: v for k, v in metadata.metrics.items() if k != "history"}
    print(json.dumps(document, indent=2))
    return 0


def _training_data(
    args: argparse.Namespace, classes: list[str]
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(train, val, description): scenes with vector labels, or image/mask pairs."""
    from models.checkpoint import read_metadata
    from models.data import pairs_from_csv, pairs_from_folders, split_pairs
    from models.scene_training import scene_training_data
    from models.training_images import load_pairs

    if args.scenes or args.slides:
        from pipeline.tools.slide_training import slide_training_data

        pixel_size = args.pixel_size
        if pixel_size is None and args.init_from:  # chips at the pixel size the weights were trained at
            pixel_size = read_metadata(args.init_from).pixel_size_m
        background = (names(args.background_classes) or classes)[0]
        spec = scene_spec(args, classes, background, pixel_size)
        data = slide_training_data(spec, tuple(args.slides)) if args.slides else scene_training_data(spec)
        for line in data.lines:
            console.print(line, highlight=False, soft_wrap=True)
        return list(data.train), list(data.val), data.description
    if args.labels:
        raise DeepLabError("--labels goes with --scenes (vector labels) or --slides (QuPath annotations)")
    if args.csv:
        pairs = pairs_from_csv(args.csv)
    elif args.images and args.masks:
        pairs = pairs_from_folders(args.images, args.masks)
    else:
        raise DeepLabError("give --scenes and --labels, --csv FILE, or --images and --masks")
    train_pairs, val_pairs = split_pairs(pairs, args.val_list, args.val_pattern, args.val_bbox)
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
    train = load_pairs(train_pairs, len(classes), args.ignore_index)
    val = load_pairs(val_pairs, len(classes), args.ignore_index)
    return list(train), list(val), description


def _cmd_train(args: argparse.Namespace) -> int:
    from models.checkpoint import read_metadata
    from models.train import TrainConfig, train

    classes = args.classes.split(",")
    starting = read_metadata(args.init_from).architecture if args.init_from else None
    architecture = args.arch or starting or DEFAULT_ARCHITECTURE
    colors = None
    if args.colors:
        colors = [
            tuple(int(c[i : i + 2], 16) for i in (0, 2, 4)) for c in args.colors.lstrip("#").split(",#")
        ]
    config = TrainConfig(
        architecture=architecture,
        pretrained=args.pretrained,
        output_stride=args.output_stride,
        classes=classes,
        colors=colors,
        band_names=names(args.band_names) or None,
        background_classes=names(args.background_classes),
        object_classes=names(args.object_classes),
        object_f1_classes=None if args.object_f1 is None else names(args.object_f1),
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
    )  # the options are checked before any data is read
    train_data, val_data, description = _training_data(args, classes)
    console.print(f"training {architecture} on {len(train_data)} images, validating on {len(val_data)}")
    data = (config, train_data, val_data, args.out, description, console)
    if args.workers or args.ray_address:  # the same loop in Ray Train workers
        from pipeline.ray.training import train_on_ray

        cluster = {
            "workers": args.workers or 2,
            "ray_address": args.ray_address,
            "storage": args.train_storage,
        }
        metadata = train_on_ray(*data, **cluster, stop_after=args.stop_after, command=args.command_line)
    else:
        metadata = train(*data, stop_after=args.stop_after, command=args.command_line)
    console.print(
        f"wrote {args.out} (val mIoU {metadata.metrics.get('val', {}).get('miou', float('nan')):.4f})"
    )
    return 0


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


def _cmd_classes(args: argparse.Namespace) -> int:
    from models.checkpoint import read_metadata, update_metadata
    from models.metadata import with_roles

    metadata = read_metadata(args.checkpoint)
    if args.background is not None or args.objects is not None:
        current = {
            role: [c.name for c in metadata.classes if c.role == role] for role in ("background", "object")
        }
        background = current["background"] if args.background is None else names(args.background)
        objects = current["object"] if args.objects is None else names(args.objects)
        try:
            classes = with_roles(metadata.classes, background, objects)
        except ValueError as error:
            raise DeepLabError(f"{args.checkpoint}: {error}") from None
        metadata = update_metadata(args.checkpoint, classes=classes)
    table = Table(title=f"classes of {args.checkpoint.name}")
    for column in ("id", "name", "colour", "role"):
        table.add_column(column)
    for index, info in enumerate(metadata.classes):
        table.add_row(str(index), info.name, f"#{info.hex_color}", info.role)
    table_console().print(table)
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from deeplab_common.atomic import write_text_atomically
    from models.card import render_card

    attribution = args.attribution.read_text() if args.attribution else ""
    text = render_card(args.checkpoint, attribution)
    if args.out:
        write_text_atomically(args.out, text)
        console.print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def add_model_commands(commands: Any) -> None:
    """The commands that make, list and describe checkpoints."""
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
    source.add_argument(
        "--val-bbox", type=bbox, help="validation = chips or ground blocks centred in minx,miny,maxx,maxy"
    )
    add_label_flags(train.add_argument_group("scenes with vector labels"))
    train.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of ground blocks held out (seeded), without --val-bbox",
    )
    train.add_argument("--block-size", type=int, default=512, help="ground blocks of the split, in pixels")
    train.add_argument(
        "--val-labels",
        action="append",
        help="[CLASS=]FILE: labels for the held-out blocks (in --val-bbox), where --labels are not trusted",
    )
    train.add_argument("--classes", required=True, help="comma-separated class names, in id order")
    train.add_argument("--colors", help="comma-separated #rrggbb colours, one per class")
    train.add_argument(
        "--band-names", help="comma-separated names of the input bands (default: red,green,blue or band1..)"
    )
    train.add_argument(
        "--background-classes", help="comma-separated classes that are background (no polygons by default)"
    )
    train.add_argument(
        "--object-classes", help="comma-separated classes of small objects, e.g. nuclei (QuPath detections)"
    )
    train.add_argument("--ignore-index", type=int, default=255)
    train.add_argument(
        "--object-f1",
        help="classes validated by object F1 (SpaceNet's), comma-separated; default: the --object-classes",
    )
    train.add_argument("--class-weights", help="comma-separated weights, or 'auto' (median frequency)")
    train.add_argument(
        "--arch", help=f"the architecture (default: --init-from's, else {DEFAULT_ARCHITECTURE})"
    )
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
    cluster = train.add_argument_group("training on a Ray cluster (Ray Train, data-parallel)")
    cluster.add_argument(
        "--ray-address", help="the cluster to train on (default with --workers: a local one)"
    )
    cluster.add_argument("--workers", type=int, help="Ray Train workers (default 2 with --ray-address)")
    cluster.add_argument(
        "--train-storage",
        help="where the run's checkpoints are kept: a path every node sees, or s3://... "
        "(default: beside --out)",
    )
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    train.set_defaults(handler=_cmd_train)

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

    roles = commands.add_parser(
        "classes",
        help="show a checkpoint's classes, or mark which are background and which are small objects",
    )
    roles.add_argument("checkpoint", type=Path)
    roles.add_argument("--background", help="comma-separated background classes ('' for none)")
    roles.add_argument("--objects", help="comma-separated classes of small objects ('' for none)")
    roles.set_defaults(handler=_cmd_classes)

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
