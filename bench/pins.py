"""Pins of the demo's outputs: sha256 of each published raster of the three `make demo` scenes.

A restructuring must leave every mask byte-identical. `--record` writes the pins
(`bench/reports/demo-pins.json`); without it the scenes are run again and compared with them, and any
difference exits 1 naming the file. The scenes run through `deeplab segment` with the options `make demo`
gives them, on the in-process engine by default or on Ray (`--engine ray`), each against its own pins: the
masks are the same on both, the confidence raster differs in a few roundings.

    python bench/pins.py --record      # before a change
    python bench/pins.py               # after it: exit 0 when every pinned file is byte-identical
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = {  # per engine: the masks agree, but the Ray actors' thread counts round a few confidences otherwise
    "local": ROOT / "bench" / "reports" / "demo-pins.json",
    "ray": ROOT / "bench" / "reports" / "demo-pins-ray.json",
}


@dataclass(frozen=True)
class DemoScene:
    """One scene of `make demo`: its file under the data folder, checkpoint, options and pinned files."""

    source: str
    model: str
    flags: tuple[str, ...]
    pinned: tuple[str, ...]
    warp_to: str | None = None  # `deeplab warp` it onto this CRS first, as `make demo` does
    warped_name: str = ""  # the warped scene's file name (its scene id is the stem)


DEMO_SCENES = (
    DemoScene(
        "kampala-buildings/scene/kampala_z21_rgb.tif",
        "models/zoo/buildings-kampala.safetensors",
        ("--vectorize",),
        ("mask.tif",),
    ),
    DemoScene(
        "kampala-buildings/scene/kampala_z21_rgb.tif",
        "models/zoo/buildings-kampala.safetensors",
        ("--probabilities", "--vectorize"),
        ("mask.tif", "probabilities.tif"),
        warp_to="EPSG:32636",
        warped_name="kampala_utm36n.tif",
    ),
    DemoScene(
        "wsi/CMU-1-Small-Region.svs",
        "models/zoo/he-stain-cmu.safetensors",
        ("--vectorize", "--ome-zarr"),
        ("mask.ome.tif",),
    ),
)


def sha256(path: Path) -> str:
    """The file's bytes; an OME-TIFF's content instead, since tifffile writes a new random UUID into its
    OME-XML on every write: each level's pixels, and the OME-XML without the UUID."""
    digest = hashlib.sha256()
    if path.name.endswith(".ome.tif"):
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            digest.update(re.sub(r'UUID="urn:uuid:[^"]*"', "", tiff.ome_metadata or "").encode())
            for level in tiff.series[0].levels:
                pixels = level.asarray()
                digest.update(f"{pixels.shape}{pixels.dtype}".encode() + pixels.tobytes())
        return digest.hexdigest()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_demo_scenes(
    data: Path, out: Path, engine: str, only: list[str] | None = None, scenes: Path | None = None
) -> dict[str, str]:
    """Segment the demo scenes into ``out`` with this tree's code (warped scenes are built in ``scenes``,
    outside it); the pinned files' sha256 by ``scene_id/file``."""
    pins: dict[str, str] = {}
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this tree, whichever checkout the venv was installed from
    deeplab = [sys.executable, "-m", "flows.cli"]
    for scene in DEMO_SCENES:
        source = data / scene.source
        if scene.warp_to:
            if only and Path(scene.warped_name).stem not in only:
                continue
            warped = (scenes or out.parent / f"{out.name}-scenes") / scene.warped_name
            warped.parent.mkdir(parents=True, exist_ok=True)
            warp = [*deeplab, "warp", str(source), "--crs", scene.warp_to, "--out", str(warped)]
            subprocess.run(warp, check=True, cwd=ROOT, env=env)
            source = warped
        elif only and source.stem not in only:
            continue
        command = [*deeplab, "segment", str(source), "--model", str(ROOT / scene.model), "--out", str(out)]
        subprocess.run([*command, *scene.flags, "--engine", engine], check=True, cwd=ROOT, env=env)
        for name in scene.pinned:
            pins[f"{source.stem}/{name}"] = sha256(out / source.stem / name)
    return pins


def compare(pinned: dict[str, str], found: dict[str, str]) -> list[str]:
    """One line per pinned file whose bytes differ (or that is missing)."""
    return [
        f"{name}: sha256 {found.get(name, 'missing')} differs from the pinned {digest}"
        for name, digest in pinned.items()
        if found.get(name) != digest
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--record", action="store_true", help="write the pins instead of checking them")
    parser.add_argument("--pins", type=Path, help="default: bench/reports/demo-pins[-ray].json by engine")
    parser.add_argument("--only", nargs="+", metavar="SCENE_ID", help="these demo scenes alone")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="deeplab-pins-") as folder,
        tempfile.TemporaryDirectory(prefix="deeplab-pins-scenes-") as scenes,
    ):
        found = run_demo_scenes(args.data, Path(folder), args.engine, args.only, Path(scenes))
    args.pins = args.pins or PINS[args.engine]
    pinned = json.loads(args.pins.read_text()) if args.pins.exists() else {}
    if args.only:
        pinned = {name: digest for name, digest in pinned.items() if name.split("/")[0] in args.only}
    if args.record:
        # --only adds to the pins of the other scenes; a whole run replaces them (a scene left the demo)
        recorded = json.loads(args.pins.read_text()) if args.pins.exists() and args.only else {}
        args.pins.write_text(json.dumps(recorded | found, indent=2) + "\n")
        print(f"wrote {args.pins}")
        return 0
    problems = compare(pinned, found)
    for line in problems:
        print(line)
    print("pins: " + ("DIFFER" if problems else f"all {len(found)} files byte-identical"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
