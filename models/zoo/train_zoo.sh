#!/usr/bin/env bash
# Reproduce the reference models in models/zoo/ from ../shared/data (see each model card).
# Usage: models/zoo/train_zoo.sh [kampala|dubai|all]   (CPU: ~45 min for both, run in parallel)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${DEEPLAB_DATA:-$here/../../../shared/data}"
deeplab="${DEEPLAB:-deeplab}"
threads="${THREADS:-1}"
which="${1:-all}"

if [[ "$which" == kampala || "$which" == all ]]; then
  # Hold out the ground of the zoom-19 tile 309614/261633 (and every zoom-20/21 chip inside it).
  "$deeplab" train --csv "$data/kampala-buildings/chips.csv" \
    --val-bbox 32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764 \
    --classes background,building --colors '#000000,#e31a1c' \
    --arch deeplabv3plus_efficientnet_lite0 --pretrained imagenet \
    --epochs 25 --batch-size 8 --crop-size 256 --lr 0.01 --seed 0 --threads "$threads" \
    --out "$here/buildings-kampala.safetensors" &
fi
if [[ "$which" == dubai || "$which" == all ]]; then
  "$deeplab" train --images "$data/dubai-landcover/images" --masks "$data/dubai-landcover/masks" \
    --val-pattern 'tile7_*' \
    --classes building,land,road,vegetation,water,unlabeled \
    --colors '#3c1098,#8429f6,#6ec1e4,#fedd3a,#e2a929,#9b9b9b' --ignore-index 255 \
    --arch deeplabv3plus_efficientnet_lite0 --pretrained imagenet \
    --epochs 6 --val-every 2 --batch-size 8 --crop-size 256 --lr 0.01 --seed 0 --threads "$threads" \
    --out "$here/landcover-dubai.safetensors" &
fi
wait
