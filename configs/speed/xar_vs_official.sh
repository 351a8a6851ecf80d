#!/usr/bin/env bash
# vgen's xAR sampler against the official xAR code on the same random-weight model, per size, one JSON each
# (`vgen bench sample --official`; README "Speed against the official code"). Needs no network: clone the official
# code beforehand (OliverRensu/xAR; the project never ships it) and pass its folder as the first argument.
#
#   bash configs/speed/xar_vs_official.sh third_party/xAR            # GPU: xar-b at B=1,16,64, 40 steps, fp16 autocast
#   DEVICE=cpu SIZES=xar-tiny STEPS=8 BATCHES=1,16 AUTOCAST=none THREADS=1 bash configs/speed/xar_vs_official.sh DIR
#
# Decoding is excluded on both sides (the official sample_tokens returns latents). Per size: one same-noise latent
# check, one warm-up round and REPEATS timed rounds of each batch size, official and vgen calls alternated. fp16
# autocast is the official evaluation's (engine_xar.py); the latent check always runs in fp32. xar-b at B=64 is about
# 0.45 PFLOP per call at 40 steps (4 cells, CFG doubles the rows): sized for one GPU in a few minutes. On 2 CPU cores
# only xar-tiny with few steps fits (README: about 7 s per call at B=16 and 8 steps).
set -euo pipefail
OFFICIAL=${1:?usage: bash configs/speed/xar_vs_official.sh PATH_TO_A_CHECKOUT_OF_OliverRensu/xAR}
OUT=${OUT:-runs/speed}
SIZES=${SIZES:-xar-b}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1,16,64}
STEPS=${STEPS:-40}
AUTOCAST=${AUTOCAST:-fp16}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
for size in $SIZES; do
    start=$(date +%s)
    HF_HUB_OFFLINE=1 "$PYTHON" -m vgen bench sample --official "$OFFICIAL" --random-xar "$size" --device "$DEVICE" \
        --batch-sizes "$BATCHES" --num-steps "$STEPS" --repeats "$REPEATS" --warmup "$WARMUP" \
        --autocast "$AUTOCAST" --threads "$THREADS" --output "$OUT/official_$size.json" > /dev/null
    echo "$size: $(( $(date +%s) - start )) s -> $OUT/official_$size.json"
done
