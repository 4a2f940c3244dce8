"""The crafted-input corpus (``bench/bad_inputs.py``, built here from the real data) run as two batches
through `deeplab segment`: each case gives its expected outcome with one line naming its file, no traceback
reaches the terminal, nothing is written outside --out, nothing partial is published, good scenes are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bench.bad_inputs import CASES, Result, build, path_of, results, run

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (links not followed) with its size and mtime."""
    found = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            info = os.lstat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def corpus_run(
    data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_buildings_model: Path,
    tiny_slide_model: Path,
) -> tuple[Path, Path, list[Result], str]:
    """The corpus through the tiny model with each zoo model's metadata: the outcomes are the checkpoint's
    metadata's and the engine's, not the weights' (``python -m bench.bad_inputs`` runs the zoo models)."""
    root = tmp_path_factory.mktemp("bad")
    folder, out = root / "corpus", root / "out"
    build(data_dir, folder)
    before = _snapshot(folder)
    printed = ""
    for kind, model in (("buildings", tiny_buildings_model), ("slide", tiny_slide_model)):
        code, text = run(folder, out, model, kind)  # type: ignore[arg-type]
        assert code == 1, f"a batch with failed scenes exits 1 ({kind}):\n{text}"
        printed += text
    assert sorted(p.name for p in root.iterdir()) == ["corpus", "out"], "nothing written beside --out"
    assert _snapshot(folder) == before, "the inputs are left as they were"
    return folder, out, results(folder, out), printed


def test_the_corpus_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_crafted_input_gives_its_outcome_and_one_line(
    corpus_run: tuple[Path, Path, list[Result], str], case: object
) -> None:
    folder, out, found, printed = corpus_run
    result = next(r for r in found if r.case is case)
    assert result.outcome == result.case.expect, result.line
    assert result.case.needle in result.line, result.line
    if result.outcome == "refused":
        named = [
            line for line in printed.splitlines() if line.startswith("failed:") and result.case.needle in line
        ]
        path = path_of(folder, result.case)
        assert any(str(path) in line for line in named), f"no failure line names {path}:\n{printed}"
        if not result.case.name.startswith(".") and "clash" not in result.case.name:
            assert not (out / path.stem / "mask.tif").exists(), "a refused scene publishes nothing"
    else:
        published = out / Path(os.path.realpath(path_of(folder, result.case))).stem
        assert {"mask.tif", "report.json", "quicklook.png"} <= {p.name for p in published.iterdir()}


@pytest.mark.slow
def test_no_traceback_reaches_the_terminal_and_nothing_partial_is_left(
    corpus_run: tuple[Path, Path, list[Result], str],
) -> None:
    _, out, _, printed = corpus_run
    assert "Traceback" not in printed
    assert "tifffile" not in printed, "a library's own complaint is not the line a user gets"
    assert not list(out.rglob(".partial-*")), "no partial output or staging is left behind"
    logs = sorted(p.name for p in (out / ".logs").iterdir())
    assert "truncated.log" in logs and "Traceback" in (out / ".logs" / "truncated.log").read_text()


@pytest.mark.slow
def test_nan_and_masked_pixels_are_nodata_in_the_mask(
    corpus_run: tuple[Path, Path, list[Result], str],
) -> None:
    _, out, _, _ = corpus_run
    with rasterio.open(out / "nan" / "mask.tif") as mask:
        labels = mask.read(1)
    assert (labels[10:40, 10:40] == 255).all() and (labels[60:70, 60:70] == 255).all()
    assert (labels[50:60, :] != 255).all(), "finite pixels are segmented"
    with rasterio.open(out / "alpha" / "mask.tif") as mask:
        labels = mask.read(1)
    assert (labels[:, :48] == 255).all() and (labels[:, 48:] != 255).all()
    assert np.count_nonzero(labels != 255) == 96 * 48
