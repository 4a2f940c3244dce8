"""How a mask's pixels are encoded, for every writer and reader of one: uint8 class ids with 255 as nodata,
and the top-class confidence as uint8 0-254 (255 nodata), published with a 1/254 scale."""

from __future__ import annotations

NODATA_LABEL = 255  # a pixel with no class: outside the valid data, or not computed yet
CONFIDENCE_SCALE = 254.0  # confidence byte = round(probability x 254); 255 stays free for nodata
