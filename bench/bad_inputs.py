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
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
KAMPALA = Path("kampala-buildings/scene/kampala_z21_rgb.tif")
CMU_SLIDE = Path("wsi/CMU-1-Small-Region.svs")
SIZE = 96  # pixels a side: small, so the whole corpus runs in about a minute on two cores
FAST = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]
TABLE_START, TABLE_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"

Outcome = Literal["published", "refused"]
Builder = Callable[["Corpus", Path], None]


@dataclass(frozen=True)
class Case:
    name: str  # the file's name in the corpus folder
    what: str  # for the table
    expect: Outcome
    needle: str  # a phrase the scene's failure line (or, published, its report's warnings) contains
    build: Builder
    model: Literal["buildings", "slide"] = "buildings"


class Corpus:
    """Writes the cases' files from a real scene: Kampala (RGB, EPSG:4326, 0.07 m) cropped to ``SIZE``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        with rasterio.open(data_dir / KAMPALA) as source:
            window = Window(1200, 900, SIZE, SIZE)
            self.pixels = source.read(window=window)  # (3, SIZE, SIZE) uint8
            self.crs = source.crs
            self.transform = source.window_transform(window)

    def profile(self, **changes: Any) -> dict[str, Any]:
        base = {
            "driver": "GTiff",
            "height": SIZE,
            "width": SIZE,
            "count": 3,
            "dtype": "uint8",
            "crs": self.crs,
            "transform": self.transform,
        }
        return base | changes

    def write(self, path: Path, pixels: np.ndarray | None = None, **changes: Any) -> None:
        pixels = self.pixels if pixels is None else pixels
        profile = self.profile(count=pixels.shape[0], height=pixels.shape[1], width=pixels.shape[2])
        profile["dtype"] = str(pixels.dtype)
        with rasterio.open(path, "w", **(profile | changes)) as sink:
            sink.write(pixels)


def _good(corpus: Corpus, path: Path) -> None:
    corpus.write(path, tiled=True, blockxsize=64, blockysize=64, compress="deflate")


def _bigtiff(corpus: Corpus, path: Path) -> None:
    corpus.write(path, BIGTIFF="YES")


def _jpeg(corpus: Corpus, path: Path) -> None:
    corpus.write(path, tiled=True, blockxsize=64, blockysize=64, compress="jpeg", photometric="ycbcr")


def _alpha(corpus: Corpus, path: Path) -> None:
    alpha = np.full((1, SIZE, SIZE), 255, np.uint8)
    alpha[0, :, : SIZE // 2] = 0  # the left half of every row
    corpus.write(path, np.concatenate([corpus.pixels, alpha]), photometric="rgb")
    with rasterio.open(path, "r+") as sink:
        sink.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]


def _internal_mask(corpus: Corpus, path: Path) -> None:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **corpus.profile()) as sink:
        sink.write(corpus.pixels)
        mask = np.full((SIZE, SIZE), 255, np.uint8)
        mask[: SIZE // 3] = 0
        sink.write_mask(mask)


def _per_band_nodata(corpus: Corpus, path: Path) -> None:
    """A VRT whose three bands each declare their own nodata value (GeoTIFF allows only one)."""
    base = path.with_name("per-band-base.data")  # not a raster suffix: not a scene of the folder
    corpus.write(base, driver="GTiff")
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>{nodata}</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">{base.name}</SourceFilename><SourceBand>{b}</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for b, nodata in ((1, 0), (2, 1), (3, 2))
    )
    gt = ", ".join(repr(v) for v in corpus.transform.to_gdal())
    path.write_text(
        f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><SRS>{corpus.crs.to_wkt()}</SRS>'
        f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>"
    )


def _one_pixel(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:, :1, :1].copy())


def _strip(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:, :1, :].copy())


def _all_nodata(corpus: Corpus, path: Path) -> None:
    corpus.write(path, np.zeros_like(corpus.pixels), nodata=0)


def _nan(corpus: Corpus, path: Path) -> None:
    pixels = corpus.pixels.astype(np.float32)
    pixels[:, 10:40, 10:40] = np.nan
    pixels[1, 60:70, 60:70] = np.inf
    corpus.write(path, pixels)


def _feet(corpus: Corpus, path: Path) -> None:
    """New York State Plane in US feet (EPSG:2263), at the scene's 0.07 m (0.23 ft) pixels."""
    corpus.write(path, crs=CRS.from_epsg(2263), transform=from_origin(980000, 200000, 0.23, 0.23))


def _antimeridian(corpus: Corpus, path: Path) -> None:
    """Geographic, its right edge on 180° E (Fiji), at the scene's 0.07 m pixels."""
    step = corpus.transform.a
    corpus.write(path, transform=from_origin(180.0 - SIZE * step, -16.8, step, step))


def _ungeoreferenced(corpus: Corpus, path: Path) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=SIZE, width=SIZE, count=3, dtype="uint8") as sink:
        sink.write(corpus.pixels)


def _rotated(corpus: Corpus, path: Path) -> None:
    t = corpus.transform
    corpus.write(path, transform=Affine(t.a, t.a * 0.2, t.c, t.a * 0.2, t.e, t.f))


def _palette(corpus: Corpus, path: Path) -> None:
    corpus.write(path, (corpus.pixels[:1] // 32).copy(), photometric="palette")
    with rasterio.open(path, "r+") as sink:
        sink.write_colormap(1, {i: (i * 32, 255 - i * 32, 128, 255) for i in range(8)})


def _one_bit(corpus: Corpus, path: Path) -> None:
    corpus.write(path, (corpus.pixels[:1] > 128).astype(np.uint8), nbits=1)


def _twelve_bit(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels.astype(np.uint16) * 16, nbits=12)


def _two_bands(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:2].copy())


def _complex(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels.astype(np.complex64))


def _huge_sparse(corpus: Corpus, path: Path) -> None:
    """Claims 300000 x 300000 pixels and stores none of them (GDAL's sparse tiles)."""
    profile = corpus.profile(height=300_000, width=300_000, tiled=True, blockxsize=512, blockysize=512)
    with rasterio.open(path, "w", **profile, BIGTIFF="YES", SPARSE_OK="TRUE"):
        pass


def _empty(corpus: Corpus, path: Path) -> None:
    path.write_bytes(b"")


def _text(corpus: Corpus, path: Path) -> None:
    path.write_text("not an image\n")


def _truncated(corpus: Corpus, path: Path) -> None:
    _good(corpus, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_tile(corpus: Corpus, path: Path) -> None:
    """A valid header whose first tile's compressed bytes are garbage."""
    import tifffile

    _good(corpus, path)
    with tifffile.TiffFile(path) as tiff:
        offset = int(tiff.pages.first.dataoffsets[0])
    data = bytearray(path.read_bytes())
    data[offset : offset + 200] = os.urandom(200)
    path.write_bytes(bytes(data))


def _png_named_tif(corpus: Corpus, path: Path) -> None:
    with rasterio.open(path, "w", driver="PNG", height=SIZE, width=SIZE, count=3, dtype="uint8") as sink:
        sink.write(corpus.pixels)


def _folder(corpus: Corpus, path: Path) -> None:
    path.mkdir()


def _link_loop(corpus: Corpus, path: Path) -> None:
    path.symlink_to(path.name)


def _broken_link(corpus: Corpus, path: Path) -> None:
    path.symlink_to("no-such-scene.tif")


def _link_to_good(corpus: Corpus, path: Path) -> None:
    target = path.parent / "elsewhere" / "target.tif"
    target.parent.mkdir(exist_ok=True)
    _good(corpus, target)
    path.symlink_to(target)


def _clash(corpus: Corpus, path: Path) -> None:
    _good(corpus, path)


def _slide_without_mpp(corpus: Corpus, path: Path) -> None:
    """A tiled pyramid TIFF named .svs, with no µm/px anywhere."""
    import tifffile

    rgb = np.moveaxis(np.tile(corpus.pixels, (1, 4, 4)), 0, -1)
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(rgb, tile=(128, 128), photometric="rgb", description="Aperio Image Library v12\r\n384x384")


def _slide_truncated(corpus: Corpus, path: Path) -> None:
    data = (corpus.data_dir / CMU_SLIDE).read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _slide_broken_level(corpus: Corpus, path: Path) -> None:
    """The CMU slide with its level-0 tile offsets pointing past the end of the file."""
    import tifffile

    shutil.copyfile(corpus.data_dir / CMU_SLIDE, path)
    with tifffile.TiffFile(path, mode="r+") as tiff:
        offsets = tiff.pages.first.tags["TileOffsets"]
        offsets.overwrite([path.stat().st_size * 4] * len(offsets.value))


CASES: list[Case] = [
    Case("good.tif", "a plain tiled GeoTIFF (the control)", "published", "", _good),
    Case("bigtiff.tif", "BigTIFF", "published", "", _bigtiff),
    Case("jpeg.tif", "JPEG-in-TIFF, YCbCr", "published", "", _jpeg),
    Case("alpha.tif", "RGBA: an alpha band masking half", "published", "", _alpha),
    Case("internal-mask.tif", "an internal mask band masking a third", "published", "", _internal_mask),
    Case("per-band-nodata.vrt", "a VRT with a nodata value per band", "published", "", _per_band_nodata),
    Case("one-pixel.tif", "1 x 1 pixel", "published", "", _one_pixel),
    Case("strip.tif", "96 x 1 pixels", "published", "", _strip),
    Case("all-nodata.tif", "every pixel nodata", "published", "the mask is empty", _all_nodata),
    Case("nan.tif", "float32 with NaN and Inf samples", "published", "NaN or infinite", _nan),
    Case("feet.tif", "EPSG:2263, US survey feet", "published", "", _feet),
    Case("antimeridian.tif", "geographic, on the antimeridian", "published", "", _antimeridian),
    Case("rotated.tif", "a rotated geotransform", "published", "", _rotated),
    Case(
        "link-to-good.tif",
        "a symbolic link to a good scene (run as its target)",
        "published",
        "",
        _link_to_good,
    ),
    Case("ungeoreferenced.tif", "no CRS, no transform", "refused", "georeferenc", _ungeoreferenced),
    Case("palette.tif", "1-band palette", "refused", "has 1 band(s) but the model expects 3", _palette),
    Case("one-bit.tif", "1-bit (NBITS=1)", "refused", "has 1 band(s)", _one_bit),
    Case("twelve-bit.tif", "uint16 with NBITS=12", "refused", "12-bit", _twelve_bit),
    Case("two-bands.tif", "2 bands", "refused", "has 2 band(s)", _two_bands),
    Case("complex.tif", "complex64 samples", "refused", "complex", _complex),
    Case("huge-sparse.tif", "sparse, claims 300000 x 300000", "refused", "is free: refused", _huge_sparse),
    Case("empty.tif", "a 0-byte file", "refused", "is empty (0 bytes)", _empty),
    Case("text.tif", "a text file named .tif", "refused", "not a readable raster", _text),
    Case("truncated.tif", "the second half cut off", "refused", "truncated.tif", _truncated),
    Case("corrupt-tile.tif", "a tile of garbage bytes", "refused", "corrupt-tile.tif", _corrupt_tile),
    Case("png.tif", "a PNG named .tif (no georeferencing)", "refused", "georeferenc", _png_named_tif),
    Case("folder.tif", "a folder named .tif", "refused", "is a folder, not a raster file", _folder),
    Case("loop.tif", "a symbolic link to itself", "refused", "is a symbolic link loop", _link_loop),
    Case("broken-link.tif", "a symbolic link to nothing", "refused", "which does not exist", _broken_link),
    Case("clash.tif", "two files with one id (clash.tif, clash.tiff)", "refused", "clash", _clash),
    Case("clash.tiff", "(its twin)", "refused", "clash", _clash),
    Case("...tif", "id '..' (would write above --out)", "refused", "outside the output folder", _good),
    Case("..tif", "id '.' (would write into --out itself)", "refused", "outside the output folder", _good),
    Case("nompp.svs", "a slide without µm/px", "refused", "µm/px", _slide_without_mpp, "slide"),
    Case("truncated.svs", "a slide cut to a third", "refused", "truncated.svs", _slide_truncated, "slide"),
    Case(
        "broken-level.svs",
        "a slide whose level 0 points past the file",
        "refused",
        "broken-level.svs",
        _slide_broken_level,
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
        rows.append(f"| `{result.case.name}` | {result.case.what} | {result.outcome} | {line or '—'} |")
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
