#!/usr/bin/env bash
# The GPU checks the speed issue asks for, as one script for a machine with one CUDA device (about 8-10
# minutes on an H200): wecolora bench with a random-weights ViT-B/16 teacher (ceilings, FLOPs, TFLOP/s and
# the fraction of the bf16 peak), then `wecolora distill` end to end on 12,800 JPEGs at 500 x 375 for 10
# epochs (the 1%-ImageNet-sized recipe) against the loop's ceiling. Results land in $OUT (default
# benchmarks/results). Fashion-MNIST makes the JPEGs when WECOLORA_FASHION_MNIST_DIR points at its files;
# without it they are noise, which times the same.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/wecolora-gpu-checks}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
stamp=$(date +%Y%m%d-%H%M%S)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")

# 1. distill end to end on a JPEG folder (it also saves the random ViT-B/16 teacher used below)
python benchmarks/distill_jpeg_folder.py --vit-b --device cuda --precision bf16 --batch-size 256 \
    --images 12800 --epochs 10 --work-dir "$WORK" > "$OUT/jpeg-distill-$stamp-$gpu-vit_base.json"
cat "$OUT/jpeg-distill-$stamp-$gpu-vit_base.json"

# 2. the bench on the same teacher (Fashion-MNIST views resized to 224, or mnist-5k where it is missing)
python -m wecolora bench --teacher "local-dir:$WORK/vit-b" --device cuda --precision bf16 --batch-size 256 \
    --images 4096 --rounds 2 --output-dir "$OUT"
