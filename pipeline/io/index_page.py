"""The output folder's ``index.html``: one page with a row per published scene (its quicklook, class areas,
timings and a link to each output), made from the scenes' reports. Plain HTML with its style inline and
relative links only: it renders from a disk, a bucket or a zip, with no network."""

from __future__ import annotations

import html
from pathlib import Path

from deeplab_common.atomic import write_text_atomically
from pipeline.io.report import SceneReport

INDEX_NAME = "index.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
img { max-width: 320px; height: auto; border: 1px solid #ccc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul { margin: 0; padding-left: 1.1rem; }
.warn { color: #a15c00; font-size: 0.9em; }
"""
# What each output file is and which tool opens it (the README's table says the same).
OPENED_WITH: dict[str, str] = {
    "mask.tif": "class mask, COG (QGIS)",
    "probabilities.tif": "top-class probability, COG (QGIS)",
    "polygons.gpkg": "polygons with class and area (QGIS)",
    "mask.ome.tif": "class mask, pyramidal OME-TIFF (QuPath)",
    "probabilities.ome.tif": "top-class probability, OME-TIFF (QuPath)",
    "polygons.geojson": "annotations and detections (drag onto the slide in QuPath)",
    "slide.ome.zarr": "the slide with the mask as its labels (napari with napari-ome-zarr)",
    "quicklook.png": "quicklook",
    "report.json": "the run's report",
    "item.json": "STAC Item (a STAC browser)",
}


def write_index_page(out_dir: Path, title: str) -> Path:
    """``index.html`` over every scene folder of ``out_dir`` that holds a report; rewritten atomically."""
    rows = []
    for report_path in sorted(Path(out_dir).glob("*/report.json")):
        try:
            report = SceneReport.read(report_path)
        except ValueError:
            continue  # a report of an older, incompatible version: the scene is listed once it is redone
        rows.append(_row(report_path.parent.name, report))
    body = (
        '<table class="scenes">\n<thead><tr>'
        + "".join(f"<th>{heading}</th>" for heading in ("scene", "quicklook", "classes", "run", "outputs"))
        + "</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
        if rows
        else "<p>No scene has been published here yet.</p>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        "<p>Each scene's class mask, with its quicklook, class areas and timings. The STAC catalogue of the "
        'same outputs is <a href="./catalog.json">catalog.json</a>; every run is in '
        '<a href="./manifest.json">manifest.json</a>.</p>\n'
        f"{body}\n</body>\n</html>\n"
    )
    path = Path(out_dir) / INDEX_NAME
    write_text_atomically(path, page)
    return path


def _row(folder: str, report: SceneReport) -> str:
    link = f"./{html.escape(folder)}/"
    quicklook = report.outputs.get("quicklook")
    picture = (
        f'<a href="{link}{html.escape(quicklook)}"><img src="{link}{html.escape(quicklook)}" '
        f'alt="quicklook of {html.escape(folder)}" loading="lazy"></a>'
        if quicklook
        else ""
    )
    scene = (
        f"<strong>{html.escape(folder)}</strong><br>{report.shape[1]}x{report.shape[0]} px"
        f"<br>{html.escape(report.crs or ('slide' if report.slide else 'no CRS'))}"
        f"<br>model {html.escape(report.checkpoint)}"
        + "".join(f'<div class="warn">{html.escape(w)}</div>' for w in report.warnings)
    )
    run = f"{report.total_seconds:.1f} s, {report.megapixels_per_second:.2f} MP/s<br>" + "<br>".join(
        f"{html.escape(stage)} {seconds:.1f} s"
        for stage, seconds in report.seconds.items()
        if stage != "total"
    )
    outputs = (
        "<ul>"
        + "".join(
            f'<li><a href="{link}{html.escape(file)}">{html.escape(file)}</a> '
            f"{html.escape(OPENED_WITH.get(file, ''))}</li>"
            for file in report.outputs.values()
        )
        + "</ul>"
    )
    cells = (scene, picture, _areas(report), run, outputs)
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _areas(report: SceneReport) -> str:
    """Class areas in the unit that reads best (m², ha or km² for scenes, mm² for slides), else pixels."""
    if report.class_areas_mm2 is not None:
        cells = {name: _slide_area(area) for name, area in report.class_areas_mm2.items()}
    elif report.class_areas_m2 is not None:
        cells = {name: _metric_area(area) for name, area in report.class_areas_m2.items()}
    else:
        cells = {name: f"{pixels:,} px" for name, pixels in report.class_pixels.items()}
    lines = "".join(
        f'<tr><td>{html.escape(name)}</td><td class="num">{value}</td></tr>' for name, value in cells.items()
    )
    return f"<table>{lines}</table>"


def _slide_area(area_mm2: float) -> str:
    return f"{area_mm2:,.3f} mm²" if area_mm2 >= 0.01 or area_mm2 == 0 else f"{area_mm2 * 1e6:,.0f} µm²"


def _metric_area(area_m2: float) -> str:
    if area_m2 >= 1e6:
        return f"{area_m2 / 1e6:,.3f} km²"
    if area_m2 >= 1e4:
        return f"{area_m2 / 1e4:,.2f} ha"
    return f"{area_m2:,.1f} m²"
