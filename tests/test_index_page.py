"""The output folder's index.html, opened in headless Chromium (Debian's package) with the network closed:
every quicklook loads, every link points at a file that is there, and nothing is fetched from elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from pipeline.cli import main
from tests.conftest import kampala_chip

CHROMIUM = Path("/usr/bin/chromium")
# As the machine's own check runs it: no sandbox as root, no GPU, no background fetches on a closed network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.slow
def test_index_page_renders_offline_with_every_quicklook(
    kampala: Path, buildings_model: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = tmp_path / "out"
    chips = tmp_path / "chips"
    chips.mkdir()
    for stem in ("OAM-1238456-1046532-21", "OAM-1238457-1046533-21"):
        shutil.copy(kampala_chip(kampala, stem)[0], chips / f"{stem}.tif")
    args = ["segment", str(chips), "--model", str(buildings_model), "--out", str(out), "--engine", "local"]
    assert main([*args, "--no-crf", "--vectorize"]) == 0
    page_path = out / "index.html"
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img", "images => images.map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
        )
        links = page.eval_on_selector_all("a", "anchors => anchors.map(a => a.href)")
        rows = page.locator("table.scenes > tbody > tr").count()
        browser.close()
    assert rows == 2
    assert len(images) == 2 and all(loaded for _, loaded in images), images
    assert all(url.startswith("file://") for url in requested), "nothing fetched from a network"
    for url in links:
        target = Path(unquote(urlparse(url).path))
        assert target.exists(), url  # the quicklooks, masks, polygons, reports, items, catalog, manifest
    assert {Path(unquote(urlparse(u).path)).name for u in links} >= {"mask.tif", "polygons.gpkg", "item.json"}
