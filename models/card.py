"""Model cards: a markdown page rendered from a checkpoint's own metadata (nothing typed in by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import file_sha256, read_metadata
from models.metadata import TTA_PHRASES, CheckpointMetadata, InputScales


def render_card(path: Path, attribution: str) -> str:
    metadata = read_metadata(path)
    lines = [
        f"# {path.stem}",
        "",
        f"`{metadata.architecture}` ({_args(metadata)}), weights {metadata.weights_dtype}, "
        f"{path.stat().st_size / 1e6:.1f} MB, sha256 `{file_sha256(path)[:16]}…`, "
        f"{metadata.software_version}.",
        "",
        "## Data",
        "",
        attribution.strip(),
        "",
        "## Classes and input",
        "",
        "| id | class | colour | role |",
        "| --- | --- | --- | --- |",
        *(f"| {i} | {c.name} | #{c.hex_color} | {c.role} |" for i, c in enumerate(metadata.classes)),
        "",
        f"Bands: {', '.join(f'{b.name} (mean {b.mean:.1f}, std {b.std:.1f})' for b in metadata.bands)}; "
        f"input {metadata.input_dtype}; ignore index {metadata.ignore_index}; "
        f"training pixel size {_pixel_size(metadata)}.",
        "",
        "## Training",
        "",
        "```",
        str(metadata.training.get("command", "")),
        "```",
        "",
        f"Seed {metadata.training.get('seed')}, {metadata.training.get('epochs_completed')} epochs, "
        f"{_training_minutes(metadata):.0f} minutes on the CPU it was trained on "
        f"({metadata.training.get('data', {}).get('train_images')} training images, "
        f"{metadata.training.get('data', {}).get('val_images')} held out).",
        "",
        *_label_lines(metadata.training.get("data", {})),
        *_stage_lines(metadata.training.get("initialised_from")),
        *_before_after_lines(metadata),
        "## Held-out results",
        "",
    ]
    for name, label in (
        ("held_out", "all held-out images"),
        ("held_out_not_used_for_crf_tuning", "held-out images not used to tune the CRF"),
    ):
        report = metadata.metrics.get(name)
        if report:
            lines += [f"### {label}", "", *_metrics_table(report, metadata), "", _evaluated_on(report), ""]
    lines += [
        "## Tiling, input scales and test-time views",
        "",
        *_tiling_lines(metadata),
        "",
        _scales_line(metadata),
        "",
        _tta_line(metadata),
        "",
        "## Dense CRF",
        "",
        *_crf_lines(metadata),
        "",
        "## Reproduce",
        "",
        "```",
        "models/zoo/train_zoo.sh    # trains the aerial reference models",
        "models/zoo/evaluate_zoo.sh # tunes their CRF, evaluates, records metrics, renders their cards",
        "models/zoo/train_slide.sh  # the slide model: chips, training, held-out evaluation, card",
        "```",
        "",
    ]
    return "\n".join(lines)


def _stage_lines(source: dict[str, Any] | None) -> list[str]:
    """Fine-tuned models: how the checkpoint they started from was trained, stage by stage."""
    if not source:
        return []
    lines = [
        f"Fine-tuned from `{source['file']}` (sha256 `{str(source['sha256'])[:16]}…`), itself trained "
        f"({source.get('epochs')} epochs, {source.get('minutes')} minutes, seed {source.get('seed')}) by:",
        "",
        "```",
        str(source.get("command", "")),
        "```",
        "",
    ]
    return lines + _stage_lines(source.get("initialised_from"))


def _label_lines(data: dict[str, Any]) -> list[str]:
    """Models trained on vector labels: each label source, the area of interest and the split by ground."""
    if not data.get("labels"):
        return []
    lines = [
        "Labels (vector, rasterised on each scene's grid crop by crop):",
        "",
        "| file | sha256 | features | CRS | classes | repaired | left out |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in data["labels"]:
        classes = ", ".join(f"{name} {count}" for name, count in label["classes"].items())
        lines.append(
            f"| {label['file']} | `{label['sha256'][:16]}…` | {label['features']} | {label['crs']} "
            f"| {classes} | {label['repaired']} | {label['skipped']} |"
        )
    aoi = data.get("aoi", {})
    where = {
        "extent": "all of each scene",
        "file": f"the polygons of {aoi.get('file')}",
        "labels buffered": f"within {aoi.get('buffer_m')} m of a label",
        "annotated regions": "the annotated regions",
    }.get(str(aoi.get("kind")), "?")
    split = data.get("split", {})
    held = (
        f"the {split.get('block_size')} px ground blocks centred in {split.get('val_bbox')}"
        if split.get("val_bbox")
        else f"a seeded {split.get('val_fraction')} of the {split.get('block_size')} px ground blocks "
        f"(seed {split.get('seed')})"
    )
    return [
        *lines,
        "",
        f"Area of interest: {where} (pixels outside it are ignored, not background). Held out: {held}: "
        f"{data.get('val_images')} blocks, {data.get('train_images')} train; the blocks are listed in the "
        "checkpoint (`deeplab info --full`).",
        "",
    ]


def _before_after_lines(metadata: CheckpointMetadata) -> list[str]:
    """Fine-tuned models: the model it started from and this one on the same held-out images."""
    history = metadata.metrics.get("history", [])
    after = metadata.metrics.get("val")
    if not history or history[0].get("epoch") != 0 or not after:
        return []
    before = history[0]["val"]
    rows = [
        ("mIoU", before["miou"], after["miou"]),
        ("boundary F1", before["boundary_f1"], after["boundary_f1"]),
    ]
    for name, value in after["per_class_iou"].items():
        rows.append((f"IoU {name}", before["per_class_iou"].get(name), value))
    for name, scores in after.get("objects", {}).items():
        rows.append((f"object F1 {name}", before.get("objects", {}).get(name, {}).get("f1"), scores["f1"]))
    adapted = (metadata.training.get("initialised_from") or {}).get("adapted", [])
    return [
        f"Before and after fine-tuning, on the same {after.get('images')} held-out images:",
        "",
        "| metric | before | after |",
        "| --- | --- | --- |",
        *(f"| {label} | {_number(old)} | {_number(new)} |" for label, old, new in rows),
        "",
        *(f"Adapted from the starting checkpoint: {line}." for line in adapted),
        *([""] if adapted else []),
    ]


def _number(value: object) -> str:
    return "–" if value is None else f"{float(value):.4f}"  # type: ignore[arg-type]


def _args(metadata: CheckpointMetadata) -> str:
    return ", ".join(f"{k}={v}" for k, v in metadata.arch_args.items())


def _pixel_size(metadata: CheckpointMetadata) -> str:
    size = metadata.pixel_size_m
    if size is None:
        return "unknown (not georeferenced)"
    return f"{size * 1e6:.3g} µm" if size < 1e-3 else f"{size:.3f} m"  # slides are in µm/px


def _training_minutes(metadata: CheckpointMetadata) -> float:
    history = metadata.metrics.get("history", [])
    return sum(float(record.get("seconds", 0)) for record in history) / 60


def _metrics_table(report: dict[str, Any], metadata: CheckpointMetadata) -> list[str]:
    parts = [key for key in ("no_crf", "crf") if key in report]
    rows = [
        "| metric | " + " | ".join("without CRF" if p == "no_crf" else "with CRF" for p in parts) + " |",
        "| --- |" + " --- |" * len(parts),
    ]
    excluded = report.get("excluded") or []
    label = "mIoU" + (f" (without {', '.join(excluded)})" if excluded else "")
    for name, key in (
        (label, "miou"),
        ("pixel accuracy", "pixel_accuracy"),
        ("boundary F1 (2 px)", "boundary_f1"),
    ):
        rows.append(f"| {name} | " + " | ".join(f"{report[p][key]:.4f}" for p in parts) + " |")
    for cls in metadata.classes:
        values = [report[p]["per_class_iou"].get(cls.name) for p in parts]
        rows.append(
            f"| IoU {cls.name} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |"
        )
    rows.append("| images | " + " | ".join(str(report[p]["images"]) for p in parts) + " |")
    return rows


def _evaluated_on(report: dict[str, Any]) -> str:
    no_crf = report.get("no_crf", {})
    tiling = no_crf.get("tiling", "whole image")
    tta = no_crf.get("tta", "none")
    views = "" if tta == "none" else f" Test-time views: logits averaged over {TTA_PHRASES[tta]}."
    multiscale = InputScales(scales=no_crf.get("scales", [1.0]), fuse=no_crf.get("fuse", "max"))
    if not multiscale.single:
        views = f" Multi-scale inputs: {multiscale.describe()}." + views
    if not isinstance(tiling, dict):
        return "The model ran on each whole image." + views
    return (
        f"The model ran on the engine's windows: {tiling['tile']} px cores in blocks of "
        f"{tiling['cores_per_window']}², halo {tiling['halo']} px (the CRF on each whole image)." + views
    )


def _tiling_lines(metadata: CheckpointMetadata) -> list[str]:
    if metadata.tiling is None:
        return ["None stored: `deeplab segment` uses its default, 512 px cores in blocks of 2²."]
    lines = [
        f"Stored in the checkpoint: `deeplab segment` cuts scenes into {metadata.tiling.describe()} unless "
        "told otherwise."
    ]
    tuning = metadata.tiling_tuning
    if tuning:
        scores = "; ".join(
            ("whole images" if not isinstance(t["tiling"], dict) else f"{t['tiling']['tile']} px")
            + _trial_scales(t)
            + ("" if t.get("tta", "none") == "none" else f" with {t['tta']} views")
            + f" {t['miou']:.4f}"
            for t in tuning["trials"]
        )
        lines += [
            "",
            f"Chosen by `deeplab tune-tiling` on {tuning['images']} images, mIoU without CRF: {scores}.",
        ]
    return lines


def _trial_scales(trial: dict[str, Any]) -> str:
    scales = trial.get("scales", [1.0])
    return "" if scales == [1.0] else f" at scales {', '.join(f'{s:g}' for s in scales)} ({trial['fuse']})"


def _scales_line(metadata: CheckpointMetadata) -> str:
    if metadata.input_scales is None or metadata.input_scales.single:
        return (
            "No multi-scale inputs stored: `deeplab segment` runs each window at its own scale unless given "
            "`--scales`."
        )
    return (
        f"Stored in the checkpoint: `deeplab segment` runs each window at {metadata.input_scales.describe()} "
        "unless told otherwise (`--scales`, `--fuse`)."
    )


def _tta_line(metadata: CheckpointMetadata) -> str:
    if metadata.tta is None:
        return "No test-time views stored: `deeplab segment` runs each window once unless given `--tta`."
    return (
        f"Stored in the checkpoint: `deeplab segment` averages the logits of {TTA_PHRASES[metadata.tta]} "
        "unless told otherwise (`--tta`)."
    )


def _crf_lines(metadata: CheckpointMetadata) -> list[str]:
    crf = metadata.crf
    line = (
        f"Parameters stored in the checkpoint: w1 = {crf.w1:g}, σα = {crf.sigma_alpha:g}, "
        f"σβ = {crf.sigma_beta:g}, w2 = {crf.w2:g}, σγ = {crf.sigma_gamma:g}, {crf.iterations} iterations."
    )
    tuning = metadata.crf_tuning
    run, why = metadata.crf_advice()
    source = metadata.crf_verdict.source if metadata.crf_verdict else ""
    advice = (
        f"`deeplab segment` runs this model {'with' if run else 'without'} the CRF unless told otherwise "
        f"(`--crf` / `--no-crf`): {why}" + (f" ({source})." if source else ".")
    )
    if not tuning:
        return [line, "", "Not tuned: the paper's defaults.", "", advice]
    return [
        advice,
        "",
        line,
        "",
        f"Tuned by `deeplab tune-crf` ({tuning['trials']} settings, coarse-to-fine, objective "
        f"{tuning['objective']}) on {tuning['images']} images ({tuning['crop']} px centre crops): "
        f"mIoU {tuning['no_crf']['miou']:.4f} without CRF, {tuning['paper_defaults']['miou']:.4f} with "
        f"the paper's defaults, {tuning['best_score']['miou']:.4f} tuned; boundary F1 "
        f"{tuning['no_crf']['boundary_f1']:.4f} / {tuning['paper_defaults']['boundary_f1']:.4f} / "
        f"{tuning['best_score']['boundary_f1']:.4f}.",
    ]
