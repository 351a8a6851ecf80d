#!/usr/bin/env bash
# vgen's VAR sampler against the official VAR code on the same random-weight model, per size, one JSON each
# (`vgen bench sample --official`; README "Speed against the official code"). Needs no network: clone the official
# code beforehand into an ignored folder (default third_party/VAR; the project never ships it) and carry it along.
#
#   bash configs/speed/var_vs_official.sh                      # GPU: d16 and d30 at B=1,16,64, fp16 autocast
#   DEVICE=cpu SIZES=var-d16 BATCHES=1,16 AUTOCAST=none REPEATS=1 bash configs/speed/var_vs_official.sh
#
# Sized for one GPU in under 8 minutes: per size one greedy parity check, one warm-up round and REPEATS timed
# rounds of each batch size, official and vgen calls alternated. On 2 CPU cores d16 at B=16 takes about 2 minutes
# per call (8.9 TFLOP in the transformer and 6.2 in the decoder per batch): use REPEATS=1 there.
set -euo pipefail
OFFICIAL=${OFFICIAL:-third_party/VAR}
OUT=${OUT:-runs/speed}
SIZES=${SIZES:-var-d16 var-d30}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1,16,64}
AUTOCAST=${AUTOCAST:-fp16}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
for size in $SIZES; do
    start=$(date +%s)
    HF_HUB_OFFLINE=1 "$PYTHON" -m vgen bench sample --official "$OFFICIAL" --random-var "$size" --device "$DEVICE" \
        --batch-sizes "$BATCHES" --repeats "$REPEATS" --warmup "$WARMUP" --autocast "$AUTOCAST" \
        --output "$OUT/official_$size.json" > /dev/null
    echo "$size: $(( $(date +%s) - start )) s -> $OUT/official_$size.json"
done
