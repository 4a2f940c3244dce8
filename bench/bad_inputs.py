"""The crafted-input corpus (issue 20): awkward and broken scenes built from the real data, run as one batch
through `deeplab segment`, and the table of what each gave (`docs/robustness.md`).

    python -m bench.bad_inputs            # build, run, check and write the table into docs/robustness.md

`tests/test_bad_inputs.py` runs the same corpus and asserts, per case, the outcome and its one line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench import bad_input_files as files
from bench.bad_input_files import Corpus

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]
LONG_NAME = "long-" + "x" * 205 + ".tif"  # an id of 210 bytes: over what the output folder's names hold
SHOWN_NAME = 40  # characters of a file name the table shows whole
TABLE_START, TABLE_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"

Outcome = Literal["published", "refused"]
Builder = Callable[[Corpus, Path], None]


@dataclass(frozen=True)
class Case:
    name: str  # the file's name in the corpus folder
    what: str  # for the table
    expect: Outcome
    needle: str  # a phrase the scene's failure line (or, published, its report's warnings) contains
    build: Builder
    model: Literal["buildings", "slide"] = "buildings"


CASES: list[Case] = [
    Case("good.tif", "a plain tiled GeoTIFF (the control)", "published", "", files.make_good),
    Case("bigtiff.tif", "BigTIFF", "published", "", files.make_bigtiff),
    Case("jpeg.tif", "JPEG-in-TIFF, YCbCr", "published", "", files.make_jpeg),
    Case("alpha.tif", "RGBA: an alpha band masking half", "published", "", files.make_alpha),
    Case(
        "internal-mask.tif",
        "an internal mask band masking a third",
        "published",
        "",
        files.make_internal_mask,
    ),
    Case(
        "per-band-nodata.vrt",
        "a VRT with a nodata value per band",
        "published",
        "",
        files.make_per_band_nodata,
    ),
    Case("one-pixel.tif", "1 x 1 pixel", "published", "", files.make_one_pixel),
    Case("strip.tif", "96 x 1 pixels", "published", "", files.make_strip),
    Case("all-nodata.tif", "every pixel nodata", "published", "the mask is empty", files.make_all_nodata),
    Case("nan.tif", "float32 with NaN and Inf samples", "published", "NaN or infinite", files.make_nan),
    Case("feet.tif", "EPSG:2263, US survey feet", "published", "", files.make_feet),
    Case("antimeridian.tif", "geographic, on the antimeridian", "published", "", files.make_antimeridian),
    Case("rotated.tif", "a rotated geotransform", "published", "", files.make_rotated),
    Case(
        "link-to-good.tif",
        "a symbolic link to a good scene (run as its target)",
        "published",
        "",
        files.make_link_to_good,
    ),
    Case("ungeoreferenced.tif", "no CRS, no transform", "refused", "georeferenc", files.make_ungeoreferenced),
    Case(
        "palette.tif",
        "1-band palette",
        "refused",
        "has 1 band(s) but the model expects 3",
        files.make_palette,
    ),
    Case("one-bit.tif", "1-bit (NBITS=1)", "refused", "has 1 band(s)", files.make_one_bit),
    Case("twelve-bit.tif", "uint16 with NBITS=12", "refused", "12-bit", files.make_twelve_bit),
    Case("two-bands.tif", "2 bands", "refused", "has 2 band(s)", files.make_two_bands),
    Case("complex.tif", "complex64 samples", "refused", "complex", files.make_complex),
    Case(
        "huge-sparse.tif",
        "sparse, claims 300000 x 300000",
        "refused",
        "is free: refused",
        files.make_huge_sparse,
    ),
    Case("empty.tif", "a 0-byte file", "refused", "is empty (0 bytes)", files.make_empty),
    Case("text.tif", "a text file named .tif", "refused", "not a readable raster", files.make_text),
    Case("truncated.tif", "the second half cut off", "refused", "truncated.tif", files.make_truncated),
    Case(
        "corrupt-tile.tif", "a tile of garbage bytes", "refused", "corrupt-tile.tif", files.make_corrupt_tile
    ),
    Case(
        "png.tif", "a PNG named .tif (no georeferencing)", "refused", "georeferenc", files.make_png_named_tif
    ),
    Case("folder.tif", "a folder named .tif", "refused", "is a folder, not a raster file", files.make_folder),
    Case("loop.tif", "a symbolic link to itself", "refused", "is a symbolic link loop", files.make_link_loop),
    Case(
        "broken-link.tif",
        "a symbolic link to nothing",
        "refused",
        "which does not exist",
        files.make_broken_link,
    ),
    Case("clash.tif", "two files with one id (clash.tif, clash.tiff)", "refused", "clash", files.make_clash),
    Case("clash.tiff", "(its twin)", "refused", "clash", files.make_clash),
    Case(
        "...tif", "id '..' (would write above --out)", "refused", "outside the output folder", files.make_good
    ),
    Case(
        "..tif",
        "id '.' (would write into --out itself)",
        "refused",
        "outside the output folder",
        files.make_good,
    ),
    Case(LONG_NAME, "a 214-character file name", "refused", "longer than the 200", files.make_good),
    Case(
        "raw-band.vrt",
        "a VRT whose raw bands read a text file",
        "refused",
        "raw VRT bands",
        files.make_raw_band_vrt,
    ),
    Case(
        "remote-source.vrt",
        "a local VRT reading a URL",
        "refused",
        "before any request",
        files.make_remote_source_vrt,
    ),
    Case(
        "zero-pixel.tif",
        "a geotransform with a pixel height of 0",
        "refused",
        "no area",
        files.make_zero_pixel,
    ),
    Case("nan-transform.tif", "a NaN in the geotransform", "refused", "not finite", files.make_nan_transform),
    Case(
        "reflectance.tif", "float64 of 0-1 for a 0-255 model", "refused", "the scale", files.make_reflectance
    ),
    Case("int8.tif", "int8 samples", "refused", "-128 to 127", files.make_int8),
    Case("nompp.svs", "a slide without µm/px", "refused", "µm/px", files.make_slide_without_mpp, "slide"),
    Case(
        "truncated.svs",
        "a slide cut to a third",
        "refused",
        "truncated.svs",
        files.make_slide_truncated,
        "slide",
    ),
    Case(
        "broken-level.svs",
        "a slide whose level 0 points past the file",
        "refused",
        "broken-level.svs",
        files.make_slide_broken_level,
        "slide",
    ),
]


@dataclass
class Result:
    case: Case
    outcome: str  # published / refused / missing (not in the run's records)
    line: str  # the failure line, or the report's warnings joined


def path_of(folder: Path, case: Case) -> Path:
    """Where a case's file lies: a folder per model, as a user keeps scenes and slides apart."""
    return folder / case.model / case.name


def build(data_dir: Path, folder: Path) -> None:
    """Every case's file(s) into ``folder``."""
    corpus = Corpus(data_dir)
    for case in CASES:
        path_of(folder, case).parent.mkdir(parents=True, exist_ok=True)
        case.build(corpus, path_of(folder, case))


def run(folder: Path, out: Path, model: Path, kind: Literal["buildings", "slide"]) -> tuple[int, str]:
    """One `deeplab segment` batch over the folder of ``kind``'s cases, as a nightly run is given it, plus
    the hidden names a folder listing leaves out (listed by hand); returns its exit code and everything it
    printed."""
    from pipeline.cli import main

    hidden = [str(path_of(folder, c)) for c in CASES if c.model == kind and c.name.startswith(".")]
    terminal = io.StringIO()
    argv = ["segment", str(folder / kind), *hidden, "--model", str(model), "--out", str(out), *FAST]
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        code = main(argv)
    return code, terminal.getvalue()


def results(folder: Path, out: Path) -> list[Result]:
    """Each case's outcome, from the manifest the runs wrote."""
    manifest = json.loads((out / "manifest.json").read_text())
    scenes = {record["source"]: record for run in manifest["runs"] for record in run["scenes"]}
    found = []
    for case in CASES:
        path = path_of(folder, case)
        record = scenes.get(str(path)) or scenes.get(os.path.realpath(path))
        if record is None:
            found.append(Result(case, "missing", ""))
            continue
        if record["outcome"] == "failed":
            found.append(Result(case, "refused", record["message"]))
            continue
        report = json.loads((out / record["scene_id"] / "report.json").read_text())
        found.append(Result(case, "published", " ".join(report.get("warnings", []))))
    return found


def table(found: list[Result], folder: Path, out: Path) -> str:
    rows = ["| file | what | outcome | the line a user sees (or the report's warning) |", "|---|---|---|---|"]
    for result in found:
        line = result.line.replace(str(folder / result.case.model) + "/", "").replace(str(out), "OUT")
        line = line.replace("|", "\\|").replace("\n", "<br>")
        line = line.split(" (details: ")[0]
        name = result.case.name
        if len(name) > SHOWN_NAME:  # the long-name case: shown by its ends
            shown = f"{name[:12]}…{name[-8:]}"
            name, line = shown, line.replace(name, shown)
        rows.append(f"| `{name}` | {result.case.what} | {result.outcome} | {line or '—'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "robustness.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dl-bad-", dir=ROOT.parent) as temp:
        folder, out = Path(temp) / "corpus", Path(temp) / "out"
        build(args.data, folder)
        kinds: list[tuple[Literal["buildings", "slide"], str]] = [
            ("buildings", "buildings-kampala"),
            ("slide", "he-stain-cmu"),
        ]
        for kind, model in kinds:
            code, _ = run(folder, out, ROOT / "models" / "zoo" / f"{model}.safetensors", kind)
            print(f"{kind}: exit code {code}", file=sys.stderr)
        found = results(folder, out)
        wrong = [r for r in found if r.outcome != r.case.expect or r.case.needle not in r.line]
        text = args.doc.read_text()
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
        args.doc.write_text(text[:start] + "\n" + table(found, folder, out) + "\n" + text[end:])
    for result in wrong:
        print(f"unexpected: {result.case.name}: {result.outcome}: {result.line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
