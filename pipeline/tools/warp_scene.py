"""Warp a raster scene onto another CRS (e.g. its UTM zone), keeping a nodata mask for the collar the new grid
adds around the footprint: what a projected grid needs for areas in m² and what the demo's scene shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject

from deeplab_common.atomic import atomic_output
from deeplab_common.errors import DataError
from pipeline.io.sources import gdal_env

BLOCK = 512


def warp_scene(source: Path, crs: str, out: Path, resampling: Resampling = Resampling.bilinear) -> Path:
    """``source`` on ``crs`` at about its own pixel count, as a tiled GeoTIFF whose internal mask marks the
    pixels the source does not cover; written under a temporary name and renamed into place."""
    try:
        target_crs = CRS.from_user_input(crs)
    except rasterio.errors.CRSError as error:
        raise DataError(f"--crs {crs}: not a CRS GDAL knows ({error})") from None
    with gdal_env(), rasterio.open(source) as scene:
        if scene.crs is None:
            raise DataError(f"{source}: has no CRS to warp from")
        transform, width, height = calculate_default_transform(
            scene.crs, target_crs, scene.width, scene.height, *scene.bounds
        )
        assert width is not None and height is not None
        profile = scene.profile | {
            "driver": "GTiff",
            "crs": target_crs,
            "transform": transform,
            "width": width,
            "height": height,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "predictor": 2,
            "nodata": None,
            "photometric": "RGB" if scene.count == 3 and scene.dtypes[0] == "uint8" else None,
        }
        profile = {k: v for k, v in profile.items() if v is not None or k == "nodata"}
        with (
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            atomic_output(out) as temp,
            rasterio.open(temp, "w", **profile) as sink,
        ):
            for band in range(1, scene.count + 1):
                warped = np.zeros((height, width), dtype=scene.dtypes[band - 1])
                reproject(
                    rasterio.band(scene, band),
                    warped,
                    dst_transform=transform,
                    dst_crs=target_crs,
                    resampling=resampling,
                )
                sink.write(warped, band)
            covered = np.zeros((height, width), dtype=np.uint8)
            reproject(
                scene.dataset_mask(),
                covered,
                src_transform=scene.transform,
                src_crs=scene.crs,
                dst_transform=transform,
                dst_crs=target_crs,
                resampling=Resampling.nearest,
            )
            sink.write_mask(covered)
    return out
