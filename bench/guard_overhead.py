"""What the run-wide and per-scene guards cost a normal run (issue 32): the same batch through this tree and
through an earlier one (a git worktree of ``--before``), alternated in one session, as ratios.

    python -m bench.guard_overhead --before f1541a8     # writes bench/reports/guard-overhead.{json,md}

The batch: Kampala chips as a nightly folder, segmented with the tiny test model on the local engine (so
the guards' share is as large as it can be: the model's own work is small), then re-run unchanged (the
nightly case: every scene skipped, the per-scene checks are nearly all that runs). Each is timed as a whole
process, the interpreter's start included, as a user meets it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.reporting import machine, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHIPS = DATA / "kampala-buildings" / "chips"
FLAGS = ["--tile", "64", "--halo", "16", "--no-crf", "--engine", "local"]


def _run(tree: Path, folder: Path, model: Path, out: Path) -> float:
    """Seconds of one `deeplab segment` of ``folder`` by the code in ``tree``."""
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "segment",
        str(folder),
        "--model",
        str(model),
        "--out",
        str(out),
    ]
    clock = time.perf_counter()
    done = subprocess.run([*argv, *FLAGS], cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - clock
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return seconds


def measure(before: Path, folder: Path, model: Path, work: Path, repeats: int) -> dict[str, Any]:
    """Median seconds of a first run and of an unchanged re-run, per tree, the trees alternated."""
    times: dict[str, dict[str, list[float]]] = {
        name: {"first": [], "rerun": []} for name in ("before", "after")
    }
    for repeat in range(repeats):
        order = [("before", before), ("after", ROOT)]
        for name, tree in order if repeat % 2 == 0 else order[::-1]:
            out = work / f"{name}-{repeat}"
            times[name]["first"].append(_run(tree, folder, model, out))
            times[name]["rerun"].append(_run(tree, folder, model, out))
    medians = {
        name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()
    }
    fastest = {name: {kind: min(v) for kind, v in kinds.items()} for name, kinds in times.items()}
    ratios = {kind: medians["after"][kind] / medians["before"][kind] for kind in ("first", "rerun")}
    fastest_ratios = {kind: fastest["after"][kind] / fastest["before"][kind] for kind in ("first", "rerun")}
    return {
        "seconds": times,
        "median_s": medians,
        "min_s": fastest,
        "after_over_before": ratios,
        "after_over_before_min": fastest_ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (before the guards)")
    parser.add_argument("--scenes", type=int, default=40, help="chips in the nightly folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from models.tiny_like import tiny_like

    with tempfile.TemporaryDirectory(prefix="dl-guards-", dir=ROOT.parent) as temp:
        work = Path(temp)
        before = work / "before-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True)
        try:
            folder = work / "incoming"
            folder.mkdir()
            for chip in sorted(CHIPS.glob("*.tif"))[: args.scenes]:
                shutil.copy(chip, folder / chip.name)
            model = tiny_like(
                ROOT / "models" / "zoo" / "buildings-kampala.safetensors", work / "tiny.safetensors"
            )
            result = measure(before, folder, model, work, args.repeats)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    result |= {"before": args.before, "scenes": args.scenes, "repeats": args.repeats, "machine": machine()}
    medians, ratios = result["median_s"], result["after_over_before"]
    fastest, fastest_ratios = result["min_s"], result["after_over_before_min"]
    lines = [
        "# The guards' cost on a normal run (issue 32)",
        "",
        f"`python -m bench.guard_overhead --before {args.before}`: {args.scenes} Kampala chips (256 x 256)",
        "as a nightly folder, the tiny test model on the local engine, each run a whole `deeplab segment`",
        f"process; median and fastest of {args.repeats}, the two trees alternated in one session.",
        "",
        "| run | before: median (min), s | after: median (min), s | after / before: median (min) |",
        "|---|---|---|---|",
        *(
            f"| {label} | {medians['before'][kind]:.2f} ({fastest['before'][kind]:.2f}) | "
            f"{medians['after'][kind]:.2f} ({fastest['after'][kind]:.2f}) | {ratios[kind]:.3f} "
            f"({fastest_ratios[kind]:.3f}) |"
            for kind, label in (
                ("first", "first run (every scene computed)"),
                ("rerun", "re-run (all unchanged)"),
            )
        ),
    ]
    write_report("guard-overhead", result, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
