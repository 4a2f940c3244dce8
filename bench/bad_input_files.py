"""The crafted files of the corpus (``bench/bad_inputs.py``): each builder writes one awkward or hostile scene
from the real data (a Kampala crop of ``SIZE`` pixels a side, the CMU slide)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window

KAMPALA = Path("kampala-buildings/scene/kampala_z21_rgb.tif")
CMU_SLIDE = Path("wsi/CMU-1-Small-Region.svs")
SIZE = 96  # pixels a side: small, so the whole corpus runs in about a minute on two cores


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

    def write_vrt(self, path: Path, bands: str) -> None:
        """A VRT on the corpus's grid with the bands given (their XML)."""
        gt = ", ".join(repr(v) for v in self.transform.to_gdal())
        path.write_text(
            f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><SRS>{self.crs.to_wkt()}</SRS>'
            f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>"
        )

    def write(self, path: Path, pixels: np.ndarray | None = None, **changes: Any) -> None:
        pixels = self.pixels if pixels is None else pixels
        profile = self.profile(count=pixels.shape[0], height=pixels.shape[1], width=pixels.shape[2])
        profile["dtype"] = str(pixels.dtype)
        with rasterio.open(path, "w", **(profile | changes)) as sink:
            sink.write(pixels)


def make_good(corpus: Corpus, path: Path) -> None:
    corpus.write(path, tiled=True, blockxsize=64, blockysize=64, compress="deflate")


def make_bigtiff(corpus: Corpus, path: Path) -> None:
    corpus.write(path, BIGTIFF="YES")


def make_jpeg(corpus: Corpus, path: Path) -> None:
    corpus.write(path, tiled=True, blockxsize=64, blockysize=64, compress="jpeg", photometric="ycbcr")


def make_alpha(corpus: Corpus, path: Path) -> None:
    alpha = np.full((1, SIZE, SIZE), 255, np.uint8)
    alpha[0, :, : SIZE // 2] = 0  # the left half of every row
    corpus.write(path, np.concatenate([corpus.pixels, alpha]), photometric="rgb")
    with rasterio.open(path, "r+") as sink:
        sink.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]


def make_internal_mask(corpus: Corpus, path: Path) -> None:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **corpus.profile()) as sink:
        sink.write(corpus.pixels)
        mask = np.full((SIZE, SIZE), 255, np.uint8)
        mask[: SIZE // 3] = 0
        sink.write_mask(mask)


def make_per_band_nodata(corpus: Corpus, path: Path) -> None:
    """A VRT whose three bands each declare their own nodata value (GeoTIFF allows only one)."""
    base = path.with_name("per-band-base.data")  # not a raster suffix: not a scene of the folder
    corpus.write(base, driver="GTiff")
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>{nodata}</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">{base.name}</SourceFilename><SourceBand>{b}</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for b, nodata in ((1, 0), (2, 1), (3, 2))
    )
    corpus.write_vrt(path, bands)


def make_one_pixel(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:, :1, :1].copy())


def make_strip(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:, :1, :].copy())


def make_all_nodata(corpus: Corpus, path: Path) -> None:
    corpus.write(path, np.zeros_like(corpus.pixels), nodata=0)


def make_nan(corpus: Corpus, path: Path) -> None:
    pixels = corpus.pixels.astype(np.float32)
    pixels[:, 10:40, 10:40] = np.nan
    pixels[1, 60:70, 60:70] = np.inf
    corpus.write(path, pixels)


def make_feet(corpus: Corpus, path: Path) -> None:
    """New York State Plane in US feet (EPSG:2263), at the scene's 0.07 m (0.23 ft) pixels."""
    corpus.write(path, crs=CRS.from_epsg(2263), transform=from_origin(980000, 200000, 0.23, 0.23))


def make_antimeridian(corpus: Corpus, path: Path) -> None:
    """Geographic, its right edge on 180° E (Fiji), at the scene's 0.07 m pixels."""
    step = corpus.transform.a
    corpus.write(path, transform=from_origin(180.0 - SIZE * step, -16.8, step, step))


def make_ungeoreferenced(corpus: Corpus, path: Path) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=SIZE, width=SIZE, count=3, dtype="uint8") as sink:
        sink.write(corpus.pixels)


def make_rotated(corpus: Corpus, path: Path) -> None:
    t = corpus.transform
    corpus.write(path, transform=Affine(t.a, t.a * 0.2, t.c, t.a * 0.2, t.e, t.f))


def make_palette(corpus: Corpus, path: Path) -> None:
    corpus.write(path, (corpus.pixels[:1] // 32).copy(), photometric="palette")
    with rasterio.open(path, "r+") as sink:
        sink.write_colormap(1, {i: (i * 32, 255 - i * 32, 128, 255) for i in range(8)})


def make_one_bit(corpus: Corpus, path: Path) -> None:
    corpus.write(path, (corpus.pixels[:1] > 128).astype(np.uint8), nbits=1)


def make_twelve_bit(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels.astype(np.uint16) * 16, nbits=12)


def make_two_bands(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels[:2].copy())


def make_complex(corpus: Corpus, path: Path) -> None:
    corpus.write(path, corpus.pixels.astype(np.complex64))


def make_huge_sparse(corpus: Corpus, path: Path) -> None:
    """Claims 300000 x 300000 pixels and stores none of them (GDAL's sparse tiles)."""
    profile = corpus.profile(height=300_000, width=300_000, tiled=True, blockxsize=512, blockysize=512)
    with rasterio.open(path, "w", **profile, BIGTIFF="YES", SPARSE_OK="TRUE"):
        pass


def make_empty(corpus: Corpus, path: Path) -> None:
    path.write_bytes(b"")


def make_text(corpus: Corpus, path: Path) -> None:
    path.write_text("not an image\n")


def make_truncated(corpus: Corpus, path: Path) -> None:
    make_good(corpus, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_corrupt_tile(corpus: Corpus, path: Path) -> None:
    """A valid header whose first tile's compressed bytes are garbage."""
    import tifffile

    make_good(corpus, path)
    with tifffile.TiffFile(path) as tiff:
        offset = int(tiff.pages.first.dataoffsets[0])
    data = bytearray(path.read_bytes())
    data[offset : offset + 200] = os.urandom(200)
    path.write_bytes(bytes(data))


def make_png_named_tif(corpus: Corpus, path: Path) -> None:
    with rasterio.open(path, "w", driver="PNG", height=SIZE, width=SIZE, count=3, dtype="uint8") as sink:
        sink.write(corpus.pixels)


def make_folder(corpus: Corpus, path: Path) -> None:
    path.mkdir()


def make_link_loop(corpus: Corpus, path: Path) -> None:
    path.symlink_to(path.name)


def make_broken_link(corpus: Corpus, path: Path) -> None:
    path.symlink_to("no-such-scene.tif")


def make_link_to_good(corpus: Corpus, path: Path) -> None:
    target = path.parent / "elsewhere" / "target.tif"
    target.parent.mkdir(exist_ok=True)
    make_good(corpus, target)
    path.symlink_to(target)


def make_clash(corpus: Corpus, path: Path) -> None:
    make_good(corpus, path)


def make_slide_without_mpp(corpus: Corpus, path: Path) -> None:
    """A tiled pyramid TIFF named .svs, with no µm/px anywhere."""
    import tifffile

    rgb = np.moveaxis(np.tile(corpus.pixels, (1, 4, 4)), 0, -1)
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(rgb, tile=(128, 128), photometric="rgb", description="Aperio Image Library v12\r\n384x384")


def make_slide_truncated(corpus: Corpus, path: Path) -> None:
    data = (corpus.data_dir / CMU_SLIDE).read_bytes()
    path.write_bytes(data[: len(data) // 3])


def make_slide_broken_level(corpus: Corpus, path: Path) -> None:
    """The CMU slide with its level-0 tile offsets pointing past the end of the file."""
    import tifffile

    shutil.copyfile(corpus.data_dir / CMU_SLIDE, path)
    with tifffile.TiffFile(path, mode="r+") as tiff:
        offsets = tiff.pages.first.tags["TileOffsets"]
        offsets.overwrite([path.stat().st_size * 4] * len(offsets.value))


def make_raw_band_vrt(corpus: Corpus, path: Path) -> None:
    """A VRT whose raw bands read a text file's bytes as pixels (``/etc/passwd``'s stand-in, beside it)."""
    secret = path.with_name("passwd.data")  # not a raster suffix: not a scene of the folder
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 400)
    band = (
        '<VRTRasterBand dataType="Byte" subClass="VRTRawRasterBand"><SourceFilename relativeToVRT="1">'
        f"{secret.name}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset>"
        f"<LineOffset>{SIZE}</LineOffset></VRTRasterBand>"
    )
    corpus.write_vrt(path, band * 3)


def make_remote_source_vrt(corpus: Corpus, path: Path) -> None:
    """A local VRT whose bands read a URL (on loopback, where nothing answers: no request is made)."""
    band = (
        '<VRTRasterBand dataType="Byte"><SimpleSource><SourceFilename>/vsicurl/http://127.0.0.1:9/scene.tif'
        "</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
    )
    corpus.write_vrt(path, band * 3)


def make_zero_pixel(corpus: Corpus, path: Path) -> None:
    t = corpus.transform
    corpus.write(path, transform=Affine(t.a, 0, t.c, 0, 0.0, t.f))


def make_nan_transform(corpus: Corpus, path: Path) -> None:
    t = corpus.transform
    corpus.write(path, transform=Affine(float("nan"), 0, t.c, 0, t.e, t.f))


def make_reflectance(corpus: Corpus, path: Path) -> None:
    """0-1 floats, as reflectance products are, for a model trained on 0-255."""
    corpus.write(path, corpus.pixels / 255.0)


def make_int8(corpus: Corpus, path: Path) -> None:
    corpus.write(path, (corpus.pixels // 2).astype(np.int8))
