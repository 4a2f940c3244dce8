#!/usr/bin/env bash
# Reproduce models/zoo/he-stain-cmu.safetensors: a DeepLab-v3+ slide model trained on classical stain labels.
# NOT a diagnostic model: its labels are colour deconvolution + thresholds (models/stain.py), not annotations.
# Data: ../shared/data/wsi/CMU-1-Small-Region.svs (OpenSlide test data, CMU, CC0 1.0), level 0, 0.499 µm/px;
# the bottom quarter of the slide is held out (chips named *-val-*).
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${DEEPLAB_DATA:-../shared/data}"
deeplab="${DEEPLAB:-deeplab}"
threads="${THREADS:-2}"
chips="${CHIPS:-work/slide-chips}"
rm -rf "$chips"
"$deeplab" slide-chips "$data/wsi/CMU-1-Small-Region.svs" --out "$chips" --size 256 --stride 128
"$deeplab" train --images "$chips/images" --masks "$chips/masks" --val-pattern '*-val-*' \
  --classes background,stroma,nuclei --colors '#f0f0f0,#e377c2,#3b1f8f' --background-classes background --object-classes nuclei --pixel-size 0.499e-6 \
  --arch deeplabv3plus_efficientnet_lite0 --pretrained imagenet --batch-size 8 --crop-size 256 \
  --epochs 12 --val-every 2 --lr 0.01 --seed 0 --threads "$threads" --out models/zoo/he-stain-cmu.safetensors
# Held-out evaluation (recorded in the checkpoint as metrics.held_out) and the model card.
rm -rf "$chips/val" && mkdir -p "$chips/val/images" "$chips/val/masks"
cp "$chips"/images/*-val-* "$chips/val/images/" && cp "$chips"/masks/*-val-* "$chips/val/masks/"
"$deeplab" evaluate --model models/zoo/he-stain-cmu.safetensors --images "$chips/val/images" \
  --masks "$chips/val/masks" --report models/zoo/reports/he-stain-cmu.held-out.json --record-as held_out
"$deeplab" card models/zoo/he-stain-cmu.safetensors --attribution models/zoo/attribution/slides.md \
  --out models/zoo/he-stain-cmu.md
