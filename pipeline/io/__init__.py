"""Data in and out: scene readers (GeoTIFF, slides), discovery, publishers (COG, OME-TIFF/Zarr), polygons."""
