"""STAC in: Items whose bands are separate COGs in a bucket (moto's S3 server), found by a search of a real
STAC API (stac-fastapi-pgstac on PostgreSQL/PostGIS, started here) or read from STAC files, give the masks of
the stacked local files; each output Item links the Item it came from."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio

from pipeline.engine.driver import run_batch
from pipeline.engine.options import SegmentOptions
from pipeline.io.stac_input import StacSearch, choose_assets
from tests.conftest import kampala_chip
from tests.stac_api import POSTGIS_HINT, StacApi, postgres_bin, stac_api

STEMS = ("OAM-1238456-1046532-21", "OAM-1238457-1046532-21")
BANDS = {"B04": "red", "B03": "green", "B02": "blue"}
LOCAL = SegmentOptions(engine="local", crf=False)
COLLECTION = "kampala-drone"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacApi]:
    if postgres_bin() is None:
        pytest.skip(f"PostgreSQL with PostGIS is not installed: {POSTGIS_HINT}")
    with stac_api(tmp_path_factory.mktemp("stac-api")) as server:
        yield server


def _band_cogs(chip: Path, folder: Path) -> dict[str, Path]:
    """The chip's three bands as three single-band COGs, as a provider publishes a scene."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    with rasterio.open(chip) as source:
        profile = source.profile | {"driver": "COG", "count": 1, "compress": "deflate"}
        for index, key in enumerate(BANDS, start=1):
            written[key] = folder / f"{key}.tif"
            with rasterio.open(written[key], "w", **profile) as band:
                band.write(source.read(index), 1)
    return written


def _item(stem: str, hrefs: dict[str, str], day: int, chip: Path) -> pystac.Item:
    with rasterio.open(chip) as source:
        west, south, east, north = rasterio.warp.transform_bounds(source.crs, "EPSG:4326", *source.bounds)
    geometry = {
        "type": "Polygon",
        "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]],
    }
    item = pystac.Item(
        id=stem,
        geometry=geometry,
        bbox=[west, south, east, north],
        datetime=datetime(2026, 12, day, 10, tzinfo=UTC),
        properties={},
        collection=COLLECTION,
    )
    for key, href in hrefs.items():
        bands = [{"name": key, "common_name": BANDS[key]}]
        item.add_asset(
            key,
            pystac.Asset(
                href, media_type=pystac.MediaType.COG, roles=["data"], extra_fields={"eo:bands": bands}
            ),
        )
    return item


def _collection(items: list[pystac.Item]) -> dict[str, Any]:
    collection = pystac.Collection(
        id=COLLECTION,
        description="Kampala drone chips, one COG per band",
        extent=pystac.Extent(
            pystac.SpatialExtent([[32.5, 0.3, 32.7, 0.4]]),
            pystac.TemporalExtent([[datetime(2026, 1, 1, tzinfo=UTC), None]]),
        ),
        license="CC-BY-4.0",
    )
    return collection.to_dict(include_self_link=False)


@pytest.fixture
def published(s3: Any, kampala: Path, tmp_path: Path) -> list[pystac.Item]:
    """Two chips as Items of separate band COGs in the bucket."""
    items = []
    for day, stem in zip((1, 3), STEMS, strict=True):
        chip = kampala_chip(kampala, stem)[0]
        cogs = _band_cogs(chip, tmp_path / "cogs" / stem)
        hrefs = {key: s3.upload(s3.bucket, f"stac/{stem}/{key}.tif", path) for key, path in cogs.items()}
        items.append(_item(stem, hrefs, day, chip))
    return items


def _local_masks(kampala: Path, model: Path, out: Path) -> dict[str, np.ndarray]:
    run_batch([kampala_chip(kampala, stem)[0] for stem in STEMS], model, out, LOCAL)
    masks = {}
    for stem in STEMS:
        with rasterio.open(out / stem / "mask.tif") as mask:
            masks[stem] = mask.read()
    return masks


def test_a_search_of_a_stac_api_gives_the_masks_of_the_stacked_files(
    api: StacApi, published: list[pystac.Item], kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    for item in published:
        item.set_self_href(f"{api.url}/collections/{COLLECTION}/items/{item.id}")
    api.load(_collection(published), [item.to_dict(include_self_link=False) for item in published])
    expected = _local_masks(kampala, tiny_buildings_model, tmp_path / "local")
    search = StacSearch(
        url=api.url, collections=[COLLECTION], bbox=(32.5, 0.3, 32.7, 0.4), datetime="2026-12-01/2026-12-05"
    )
    out = tmp_path / "out"
    batch = run_batch(search, tiny_buildings_model, out, LOCAL)
    assert sorted(r.scene_id for r in batch.records) == sorted(STEMS)
    assert all(r.outcome == "done" for r in batch.records)
    for stem in STEMS:
        with rasterio.open(out / stem / "mask.tif") as mask:
            assert np.array_equal(mask.read(), expected[stem])
        item = pystac.Item.from_file(str(out / stem / "item.json"))
        (link,) = item.get_links("derived_from")
        with urllib.request.urlopen(link.href, timeout=10) as answer:  # it resolves, to the source Item
            assert json.loads(answer.read())["id"] == stem
    # the Items came from one Collection: the output catalog is a Collection of theirs, spanning them
    collection = pystac.Collection.from_file(str(out / "catalog.json"))
    assert collection.id == f"{COLLECTION}-deeplab" and collection.license == "CC-BY-4.0"
    assert sorted(link.target for link in collection.get_item_links()) == [f"./{s}/item.json" for s in STEMS]
    (box,) = collection.extent.spatial.bboxes
    boxes = [json.loads((out / stem / "item.json").read_text())["bbox"] for stem in STEMS]
    assert box == [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    from stac_pydantic import Collection as CollectionModel

    CollectionModel.model_validate(json.loads((out / "catalog.json").read_text()))
    # a nightly re-run: every Item unchanged (the VRT and each band's ETag), so skipped
    again = run_batch(search, tiny_buildings_model, out, LOCAL)
    assert [r.outcome for r in again.records] == ["skipped", "skipped"]
    # a window that holds one Item
    later = search.model_copy(update={"datetime": "2026-12-02T00:00:00Z/2026-12-05T00:00:00Z"})
    assert [r.scene_id for r in run_batch(later, tiny_buildings_model, out, LOCAL).records] == [STEMS[1]]
    # the same search from the command line, into a fresh folder
    from pipeline.cli.parser import main

    command = ["segment", "--stac-url", api.url, "--stac-collections", COLLECTION]
    command += ["--stac-datetime", "2026-12-02/2026-12-05", "--stac-bbox", "32.5", "0.3", "32.7", "0.4"]
    command += [
        "--model",
        str(tiny_buildings_model),
        "--out",
        str(tmp_path / "cli"),
        "--engine",
        "local",
        "--no-crf",
    ]
    assert main(command) == 0
    assert sorted(p.parent.name for p in (tmp_path / "cli").glob("*/item.json")) == [STEMS[1]]
    assert main(["segment", "--model", str(tiny_buildings_model), "--out", str(tmp_path / "none")]) == 2


def test_a_relative_window_is_made_absolute_each_run() -> None:
    now = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    search = StacSearch(url="http://127.0.0.1:1", datetime="P1D")
    assert search.interval(now) == "2026-12-04T02:00:00Z/2026-12-05T02:00:00Z"
    assert StacSearch(url="x", datetime="PT6H").interval(now) == "2026-12-04T20:00:00Z/2026-12-05T02:00:00Z"
    assert StacSearch(url="x", datetime="2026-12-01/..").interval(now) == "2026-12-01/.."


def test_stac_files_are_inputs_and_a_changed_band_is_redone(
    s3: Any, published: list[pystac.Item], kampala: Path, tiny_buildings_model: Path, tmp_path: Path
) -> None:
    collection = pystac.ItemCollection(published)
    listed = tmp_path / "items.json"
    listed.write_text(json.dumps(collection.to_dict()))
    expected = _local_masks(kampala, tiny_buildings_model, tmp_path / "local")
    out = tmp_path / "out"
    batch = run_batch(str(listed), tiny_buildings_model, out, LOCAL)
    assert [r.outcome for r in batch.records] == ["done", "done"]
    assert json.loads((out / "catalog.json").read_text())["type"] == "Catalog"  # no Collection was given
    with rasterio.open(out / STEMS[0] / "mask.tif") as mask:
        assert np.array_equal(mask.read(), expected[STEMS[0]])
    # one band of one Item re-uploaded with other pixels: that Item is redone, the other skipped
    other = _band_cogs(kampala_chip(kampala, "OAM-1238448-1046528-21")[0], tmp_path / "other")
    s3.upload(s3.bucket, f"stac/{STEMS[0]}/B04.tif", other["B04"])
    again = run_batch(str(listed), tiny_buildings_model, out, LOCAL)
    assert {r.scene_id: r.outcome for r in again.records} == {STEMS[0]: "done", STEMS[1]: "skipped"}

    catalog = pystac.Catalog(id="local", description="two Items")
    for item in published:
        catalog.add_item(item.clone())
    catalog.normalize_and_save(str(tmp_path / "catalog"), pystac.CatalogType.SELF_CONTAINED)
    from_catalog = run_batch(
        str(tmp_path / "catalog" / "catalog.json"), tiny_buildings_model, tmp_path / "c", LOCAL
    )
    assert sorted(r.scene_id for r in from_catalog.records if r.outcome == "done") == sorted(STEMS)


def test_assets_are_chosen_by_what_the_model_needs(published: list[pystac.Item], tmp_path: Path) -> None:
    item = published[0]
    assert choose_assets(item, ["red", "green", "blue"], None) == [("B04", 1), ("B03", 1), ("B02", 1)]
    assert choose_assets(item, ["red", "green", "blue"], ["B02", "B03", "B04"]) == [
        ("B02", 1),
        ("B03", 1),
        ("B04", 1),
    ]
    visual = pystac.Item("v", None, None, datetime(2026, 12, 1, tzinfo=UTC), {})
    visual.add_asset("visual", pystac.Asset("s3://b/v.tif", roles=["visual"]))
    assert choose_assets(visual, ["red", "green", "blue"], None) == [
        ("visual", 1),
        ("visual", 2),
        ("visual", 3),
    ]
    with pytest.raises(Exception, match=r"v: no assets give the model's bands red, nir") as refused:
        choose_assets(visual, ["red", "nir"], None)
    assert "\n" not in str(refused.value) and "--assets" in str(refused.value)


def test_an_assets_file_checksum_is_its_identity(
    s3: Any, published: list[pystac.Item], kampala: Path, tmp_path: Path
) -> None:
    """Assets that declare ``file:checksum`` are known by it, with no request: a re-upload the catalog does
    not declare goes unseen (the catalog is trusted, as documented), a new declared checksum is seen."""
    from pipeline.engine.manifest import Manifest
    from pipeline.io.stac_input import scene_vrt

    item = published[0]
    for key, asset in item.assets.items():
        asset.extra_fields["file:checksum"] = f"1220{key:0>64}"[:68]
    manifest = Manifest(tmp_path / "out")
    vrt = scene_vrt(item, ["red", "green", "blue"], None, tmp_path / "stac")
    first = manifest.input_identity(vrt)
    other = _band_cogs(kampala_chip(kampala, "OAM-1238448-1046528-21")[0], tmp_path / "other")
    s3.upload(s3.bucket, f"stac/{item.id}/B04.tif", other["B04"])
    assert manifest.input_identity(vrt) == first  # the declared checksums stand for the assets
    assert manifest.input_identity(vrt, verify=True) != first  # --verify-inputs reads them
    item.assets["B04"].extra_fields["file:checksum"] = "1220" + "f" * 64
    assert (
        manifest.input_identity(scene_vrt(item, ["red", "green", "blue"], None, tmp_path / "stac")) != first
    )
