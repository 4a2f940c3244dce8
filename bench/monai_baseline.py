"""The same model, window and overlap through MONAI's ``sliding_window_inference``, for comparison.

MONAI (as TorchGeo-style scripts do) holds the whole scene and its full probability map in memory; the
window is our core + 2 halo and the overlap makes its stride our core, so both run the same windows.
Run as a separate process by bench/engine.py so that its peak RSS is its own. Needs ``pip install monai``.
``--prepared`` gives MONAI the model as the engine runs it (``models.optimize.for_inference``); without it,
the model as a MONAI user loads it from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

from models.checkpoint import load_checkpoint
from models.inference import normalise
from models.optimize import for_inference
from pipeline.engine.workers import peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scene", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tile", type=int, required=True)
    parser.add_argument("--halo", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="run the engine's prepared model (BatchNorm folded, channels last)",
    )
    args = parser.parse_args()
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.model)
    model = for_inference(loaded.model) if args.prepared else loaded.model.eval()
    started = time.perf_counter()
    with rasterio.open(args.scene) as source:
        image = source.read()
        profile = source.profile
    window = args.tile + 2 * args.halo
    with torch.inference_mode():
        batch = normalise(image, loaded.metadata.bands)[None]
        probabilities = sliding_window_inference(
            batch,
            roi_size=(window, window),
            sw_batch_size=args.batch_size,
            predictor=lambda x: torch.softmax(model(x), 1),
            overlap=2 * args.halo / window,
            mode="constant",
            padding_mode="reflect",
        )
        assert isinstance(probabilities, torch.Tensor)
        labels = probabilities.argmax(1)[0].to(torch.uint8).numpy()
    profile.update(count=1, dtype="uint8", nodata=255, compress="deflate", tiled=True)
    with rasterio.open(args.out, "w", **profile) as sink:
        sink.write(labels[None])
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "megapixels_per_second": image.shape[1] * image.shape[2] / 1e6 / seconds,
                "peak_rss_mb": peak_rss_mb(),
                "classes_seen": int(np.unique(labels).size),
            }
        )
    )


if __name__ == "__main__":
    main()
