#!/usr/bin/env bash
# Reproduce the reference models in models/zoo/ from ../shared/data (see each model card).
# Usage: models/zoo/train_zoo.sh [kampala|kampala-v2|kampala-osm|dubai|dubai-lite0|all]
# From ImageNet EfficientNet-Lite2 (kampala, dubai) and -Lite0 (the compact -lite0 models): plain cross-entropy
# with the poly schedule; kampala then gets a second, class-weighted stage (its held-out errors were mostly
# missed buildings; recall 0.67 at precision 0.86 on Lite0). On the 2-core CPU it was made on, alone with
# THREADS=2: kampala ~31 + 13 min, dubai ~26 min (16 epochs); dubai-lite0 ~55 min on one thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${DEEPLAB_DATA:-../shared/data}"
deeplab="${DEEPLAB:-deeplab}"
threads="${THREADS:-1}"
stages="${STAGES:-models/zoo/stages}"
which="${1:-all}"
mkdir -p "$stages"

kampala() {
  # Hold out the ground of the zoom-19 tile 309614/261633 (and every zoom-20/21 chip inside it).
  local common=(--csv "$data/kampala-buildings/chips.csv"
    --val-bbox 32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764
    --classes background,building --colors '#000000,#e31a1c' --background-classes background --arch "${KAMPALA_ARCH:-deeplabv3plus_efficientnet_lite2}"
    --batch-size 8 --crop-size 256 --threads "$threads")
  local name="${KAMPALA_NAME:-buildings-kampala}"
  "$deeplab" train "${common[@]}" --pretrained imagenet --epochs 25 --lr 0.01 --seed 0 \
    --out "$stages/$name.stage1.safetensors"
  "$deeplab" train "${common[@]}" --init-from "$stages/$name.stage1.safetensors" \
    --class-weights 1,2 --epochs 10 --lr 0.005 --seed 1 --out "models/zoo/$name.safetensors"
  # On Lite2 (the reference model): 25 + 10 epochs in 31 + 13 minutes alone on 2 threads; held-out val mIoU
  # 0.782 after stage 1, 0.785 after stage 2 (Lite0, same recipe: 0.740, 0.749).
  # The compact model buildings-kampala-lite0 (tests and benchmarks) is the same recipe on Lite0:
  #   KAMPALA_ARCH=deeplabv3plus_efficientnet_lite0 KAMPALA_NAME=buildings-kampala-lite0 THREADS=1 train_zoo.sh kampala
  # Tried on Lite0 and not kept: a third stage from it (--class-weights 1,2 --epochs 20 --lr 0.005 --seed 2):
  # its held-out val mIoU went 0.742, 0.765, 0.768, 0.756, 0.739, 0.748, 0.744, 0.741, 0.744 over epochs
  # 2-18 on the same 21 held-out chips where the model has 0.749: a transient peak, no lasting gain
  # (stopped at epoch 18 of 20).
}

kampala_v2() {
  # DeepLab-v2 ASPP (no image pooling) on the same split: the reference for exact tiling (seam tests), not
  # for quality. lr 0.01 diverged (loss 1.3 -> 1.9 in two epochs): summed atrous branches without BN.
  "$deeplab" train --csv "$data/kampala-buildings/chips.csv" \
    --val-bbox 32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764 \
    --classes background,building --colors '#000000,#e31a1c' --background-classes background --arch deeplabv2_efficientnet_lite0 \
    --batch-size 8 --crop-size 256 --threads "$threads" --pretrained imagenet --epochs 20 --val-every 4 \
    --lr 0.002 --seed 0 --out models/zoo/buildings-kampala-v2.safetensors
}

kampala_osm() {
  # The Kampala scene and the OpenStreetMap footprints as published (vector labels, rasterised crop by crop),
  # with the zoo model's architecture and budget (25 epochs from ImageNet, then 10 class-weighted ones) and
  # its held-out ground: the zoom-19 cell below, here the four 512 px ground blocks centred in it.
  local name="${KAMPALA_OSM_NAME:-buildings-kampala-osm}"
  local common=(--scenes "$data/kampala-buildings/scene/kampala_z21_rgb.tif"
    --labels "building=$data/kampala-buildings/labels/osm-buildings.geojson" --scale-range ${KAMPALA_OSM_SCALES:-0.75 1.25}
    --val-bbox 32.595062255859375,0.35018702872728885,32.59574890136719,0.3508736613849764
    --classes background,building --colors '#000000,#e31a1c' --background-classes background
    --arch deeplabv3plus_efficientnet_lite2 --batch-size 8 --crop-size 256 --threads "$threads")
  "$deeplab" train "${common[@]}" --pretrained imagenet --epochs 25 --lr 0.01 --seed 0 \
    --out "$stages/$name.stage1.safetensors"
  "$deeplab" train "${common[@]}" --init-from "$stages/$name.stage1.safetensors" \
    --class-weights 1,2 --epochs 10 --lr 0.005 --seed 1 --out "$stages/$name.safetensors"
}

dubai() {
  local common=(--images "$data/dubai-landcover/images" --masks "$data/dubai-landcover/masks"
    --val-pattern 'tile7_*' --classes building,land,road,vegetation,water,unlabeled
    --colors '#3c1098,#8429f6,#6ec1e4,#fedd3a,#e2a929,#9b9b9b' --background-classes unlabeled --ignore-index 255
    --arch deeplabv3plus_efficientnet_lite2 --batch-size 8 --crop-size 256 --threads "$threads")
  "$deeplab" train "${common[@]}" --pretrained imagenet --epochs 16 --val-every 8 --lr 0.01 --seed 0 \
    --out models/zoo/landcover-dubai.safetensors
  # Lite2, THREADS=2, alone: ~94 s per epoch (an epoch: 70 batches of 8 crops of 256 px, the training area),
  # 29 minutes with validation; val mIoU over six classes on whole tile-7 images 0.454 after epoch 8, 0.480 after 16.
  # The earlier 8-epoch schedule reached 0.454 (0.460 after a 4-epoch continuation at lr 0.003); over the five
  # real classes on the engine's windows: 0.560 (8 epochs), 0.568 (8 + 4), 0.579 (16).
  # Tried from this model and not kept (--init-from it, lr 0.003, seed 1; one view, 192 px cores, tile 7):
  # 6 epochs on 256 px crops 0.578 (val 0.479); 4 epochs on 384 px crops (--crop-size 384) 0.579 (256 px cores:
  # 0.580; val 0.483). A class-weighted one for the weak classes (--class-weights 1,1,1.5,1.5,1,1, 4 epochs, lr
  # 0.003, seed 1): val 0.478; one view at 192 px over tile 7 0.581 (road 0.463 from 0.444, vegetation 0.446,
  # water 0.606 from 0.619) against 0.579: +0.002, short of the 0.006 the target needs; not kept. The uniform
  # weight average of it and this model (a soup): 0.581 as well; not kept.
}

dubai_lite0() {
  # The compact model landcover-dubai-lite0 (the engine's tests and benchmarks), 60 minutes on one thread.
  "$deeplab" train --images "$data/dubai-landcover/images" --masks "$data/dubai-landcover/masks" \
    --val-pattern 'tile7_*' --classes building,land,road,vegetation,water,unlabeled \
    --colors '#3c1098,#8429f6,#6ec1e4,#fedd3a,#e2a929,#9b9b9b' --background-classes unlabeled --ignore-index 255 \
    --arch deeplabv3plus_efficientnet_lite0 --batch-size 8 --crop-size 256 --threads "$threads" \
    --pretrained imagenet --epochs 6 --val-every 2 --lr 0.01 --seed 0 \
    --out models/zoo/landcover-dubai-lite0.safetensors
  # A class-weighted second stage (--init-from it, --class-weights auto, 3 epochs, lr 0.005, seed 1) was tried and
  # lowered the held-out mIoU over the five real classes from 0.500 to 0.461, so the zoo keeps this single stage.
  # A plain continuation (--init-from it, 8 epochs, lr 0.005, seed 2) ran at 650-1965 s per epoch beside other
  # jobs and was stopped after epoch 3 (val mIoU over six classes 0.396 at epoch 2, 0.42 before it).
  # The papers' scale augmentation, from ImageNet (--scale-range 0.5 2.0, 10 epochs, lr 0.01, seed 0, 51 min
  # alone on 2 threads) was tried too: held-out mIoU over the five real classes 0.455 (road 0.24, vegetation
  # 0.31) against this model's 0.506 (same evaluation code) — not kept. Evaluating this model on tile 7 at
  # half scale (--scales 0.5) gives 0.522 (0.75: 0.522): tile 7's objects are larger in pixels than tiles 1-6's.
}

[[ "$which" == kampala || "$which" == all ]] && kampala &
[[ "$which" == kampala-v2 || "$which" == all ]] && kampala_v2 &
[[ "$which" == dubai || "$which" == all ]] && dubai &
[[ "$which" == dubai-lite0 ]] && dubai_lite0 &
[[ "$which" == kampala-osm ]] && kampala_osm &
wait
