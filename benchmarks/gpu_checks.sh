#!/usr/bin/env bash
# The GPU checks of the speed and faithful-views issues, as one script for a machine with one CUDA device (about
# 12 minutes expected on an H200 at the default sizes, not yet measured: run it in two calls under a 10-minute
# limit, e.g. STEPS="views cold" then STEPS="warm eager bench"). Results land in $OUT (default
# benchmarks/results), one JSON each:
#
#   1. views-*.json: the ways to make the paper's views from 500 x 375 JPEGs (real photos): disk per image,
#      views/s on the GPU and PSNR against PIL's pipeline at crop scales 0.2/0.5/1.0 -- wecolora 0.3's 258 px
#      store + grid_sample, the 501 and 579 px stores + PIL's resampling (the 579 one is wecolora's), and the
#      JPEG bytes decoded on the GPU (torchvision.io.decode_jpeg(device="cuda"), a batch per call);
#   2. jpeg-distill-*-cold.json: `wecolora distill` of a random ViT-B/16 (224 px, r=2, rank 128, bf16, compiled)
#      from a folder of 12,800 JPEGs at 500 x 375 for 10 epochs, end to end (image store build, compile and
#      export included): images/s and the fraction of the ceiling (the same compiled loop on batches already on
#      the GPU). Target: >= 0.6 end to end; the goal: the 10 epochs in under 45 s;
#   3. jpeg-distill-*-warm.json: the same with the teacher cache warm (a first run fills it, a second reads it;
#      one view per image, --cache-views 1, so the cache holds 3.9 GB, not 39);
#   4. jpeg-distill-*-eager.json: the same as 2 without torch.compile (3 epochs: per-epoch images/s compare);
#   5. bench-*.json: `wecolora bench` on the same teacher (its cold/warm ceilings, FLOPs, TFLOP/s).
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
#   SMALL=1 bash benchmarks/gpu_checks.sh     # the CPU-sized variant (no GPU: bundled teacher, 256 JPEGs)
#   STEPS="cold warm" bash benchmarks/gpu_checks.sh   # some of the steps: views cold warm eager bench
#
# Fashion-MNIST makes the distillation's JPEGs when WECOLORA_FASHION_MNIST_DIR (or the Debian package) has its
# files; without it they are noise, which times the same. The views' JPEGs come from scikit-image's photos.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/wecolora-gpu-checks}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
stamp=$(date +%Y%m%d-%H%M%S)
STEPS=${STEPS:-views cold warm eager bench}

if [[ -n "${SMALL:-}" ]]; then  # the same steps at a size 2 CPU cores run in minutes
    device=cpu; tag=cpu-small
    views=(--images 128 --batch 32 --rounds 2 --threads 1)
    distill=(--teacher bundled --device cpu --precision fp32 --batch-size 64 --images 256 --epochs 2)
    eager_epochs=2
    bench=(--teacher bundled --device cpu --quick)
else
    device=cuda
    tag=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
    views=(--images 2048 --batch 256 --rounds 3)
    distill=(--vit-b --device cuda --precision bf16 --batch-size 256 --images 12800 --epochs 10)
    eager_epochs=3
    bench=(--teacher "local-dir:$WORK/vit-b" --device cuda --precision bf16 --batch-size 256 --images 4096 --rounds 2)
fi

run() {  # run STEP NAME COMMAND...: stdout to $OUT/NAME, shown too; a failed check does not stop the others
    local step=$1 name=$2; shift 2
    [[ " $STEPS " == *" $step "* ]] || return 0
    echo "== $name: $*" >&2
    if "$@" > "$OUT/$name"; then cat "$OUT/$name"; else echo "!! $name failed" >&2; fi
}

# 1. the faithful views' cost and fidelity, and GPU JPEG decoding
run views "views-$stamp-$tag.json" $PYTHON benchmarks/view_paths.py --device "$device" "${views[@]}" --work-dir "$WORK/views"
# 2-4. distill end to end on a JPEG folder (each saves the random ViT-B/16 teacher that 5 uses, seeded: the same)
run cold "jpeg-distill-$stamp-$tag-cold.json" $PYTHON benchmarks/distill_jpeg_folder.py "${distill[@]}" --work-dir "$WORK"
run warm "jpeg-distill-$stamp-$tag-warm.json" $PYTHON benchmarks/distill_jpeg_folder.py "${distill[@]}" \
    --work-dir "$WORK" --cache warm --cache-views 1
run eager "jpeg-distill-$stamp-$tag-eager.json" $PYTHON benchmarks/distill_jpeg_folder.py "${distill[@]}" \
    --work-dir "$WORK" --no-compile --epochs "$eager_epochs"
# 5. the bench on the same teacher (Fashion-MNIST views resized to 224, or mnist-5k where it is missing)
run bench "bench-$stamp-$tag.txt" $PYTHON -m wecolora bench "${bench[@]}" --output-dir "$OUT"
