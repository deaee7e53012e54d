#!/usr/bin/env bash
# The H100 figures in bench/README.md, in priority order, each under its own time limit so that one
# slow run cannot take the others with it. Usage (GPU machine, DALI importable):
#     OUT=bench/results bash bench/h100_session.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S="python3 -m sslight_dali.cli bench"
run() { local t=$1; shift; echo "### $*"; timeout "$t" "$@" 2>&1 | grep -vE "^\s*$|Warning|warn\(" | tail -8; }
# 1. ResNet18 end to end beside its model ceiling: DALI gpu vs torchvision with all 16 cores
run 170 $S compare configs/dino/resnet18_sslight.yaml --bench train --variants dali:gpu,torchvision:cpu \
    --threads 16 --batch-size 128 --repeats 3 --steps 32 --warmup 16 --json $OUT/h100-compare-train-dino_resnet18_sslight.json
# 2. view sampling alone, random vs fixed jitter order (DALI gpu)
run 80 $S pipeline configs/dino/resnet18_sslight.yaml --device gpu --threads 8 --batch-size 128 --repeats 3 \
    --steps 30 --warmup 10 --sweep recipe.augment.jitter_order=random,fixed --json $OUT/h100-sweep-jitter-order-dali-gpu-dino_resnet18_sslight.json
# 3. MobileNetV2 and ViT-Tiny end to end beside their model ceilings (DALI gpu)
for c in vit_tiny_sslight mobilenetv2_sslight; do
  run 120 $S train configs/dino/$c.yaml --device gpu --threads 8 --batch-size 128 --repeats 3 --steps 20 \
      --warmup 12 --json $OUT/h100-train-dino_$c.json
done
# 4. per-op cost of the GPU graph
run 120 $S pipeline configs/dino/resnet18_sslight.yaml --device gpu --threads 8 --batch-size 128 --repeats 3 \
    --steps 20 --warmup 8 --profile-ops --json $OUT/h100-profile-dali-gpu-dino_resnet18_sslight.json
ls -la $OUT
