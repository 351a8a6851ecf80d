#!/bin/bash
# Speculative decoding on the Shapes world, end to end: train the drafters and MuLo-SD's up-sampler on the raster
# runs' tokenizer, then 'vgen bench speculative' for every method against the 128 px raster target, and the combined
# speed-quality plot. Run it from the repository root under the heavy lock:
#
#   bash configs/shapes/spec_train_and_bench.sh RASTER_RUNS OUT
#
# RASTER_RUNS holds raster_vq/final and raster_s1_128/final (and raster_s1_64/final, used as the MuLo-SD drafter when
# present; otherwise spec_mulo_drafter_64.yaml is trained). Sizes come from the environment: DRAFTER_SECONDS,
# UPSAMPLER_SECONDS, LOW_SECONDS (training budgets; train.steps is set from a 20-step throughput probe so that the
# cosine schedule ends in time), REPEATS (timed rounds), GENEVAL_IPP (images per prompt), FID_N (FID samples),
# TAUS, DELTAS (the sweeps), QUALITY=0 to measure speed only.
set -euo pipefail
RASTER=${1:?raster runs folder (raster_vq/final, raster_s1_128/final)}
OUT=${2:-runs/spec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
VGEN=${VGEN:-.venv/bin/vgen}
VQ=$RASTER/raster_vq/final
TARGET=$RASTER/raster_s1_128/final
mkdir -p "$OUT"

steps_for() {  # steps_for LOG SECONDS: steps that fit SECONDS at the probe's seconds per step
  python3 - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
a, b = rows[0], rows[-1]
per_step = (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
print(max(100, int(float(sys.argv[2]) / per_step)))
PY
}

train() {  # train TASK CONFIG NAME SECONDS [--set ...]
  local task=$1 config=$2 name=$3 seconds=$4
  shift 4
  if [ -f "$OUT/$name/final/config.json" ] || [ -f "$OUT/$name/final/model_index.json" ]; then return; fi
  rm -rf "$OUT/${name}_probe"
  $VGEN train "$task" --config "$config" --out "$OUT/${name}_probe" --no-progress --set "$@" train.steps=20 \
      train.log_every=5 train.sample_every=0 train.ckpt_every=0 > "$OUT/${name}_probe.log" 2>&1
  local steps
  steps=$(steps_for "$OUT/${name}_probe/log.jsonl" "$seconds")
  echo "$name: $steps steps for $seconds s ($(date +%T))"
  /usr/bin/time -f "$name %e s wall" $VGEN train "$task" --config "$config" --out "$OUT/$name" --no-progress \
      --set "$@" train.steps="$steps" train.max_seconds=$((seconds * 3 / 2)) > "$OUT/$name.log" 2>&1
  tail -1 "$OUT/$name/log.jsonl"
}

echo "=== training $(date +%T); load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -f "$RASTER/raster_tokens_128.pt" ] && [ ! -f runs/spec_tokens_128.pt ] && cp "$RASTER/raster_tokens_128.pt" runs/spec_tokens_128.pt
train raster-ar configs/shapes/spec_drafter_128.yaml spec_drafter_128 "${DRAFTER_SECONDS:-600}" task.tokenizer="$VQ"
train latent-upsampler configs/shapes/spec_upsampler.yaml spec_upsampler "${UPSAMPLER_SECONDS:-600}" task.tokenizer="$VQ"
LOW=$RASTER/raster_s1_64/final
if [ ! -f "$LOW/model_index.json" ]; then
  [ -f "$RASTER/raster_tokens_64.pt" ] && [ ! -f runs/spec_tokens_64.pt ] && cp "$RASTER/raster_tokens_64.pt" runs/spec_tokens_64.pt
  train raster-ar configs/shapes/spec_mulo_drafter_64.yaml spec_mulo_drafter_64 "${LOW_SECONDS:-900}" task.tokenizer="$VQ"
  LOW=$OUT/spec_mulo_drafter_64/final
fi

echo "=== benchmarks $(date +%T); load $(cut -d' ' -f1-3 /proc/loadavg)"
REF=$OUT/fid_ref_shapes128.npz
QUALITY_ARGS=()
if [ "${QUALITY:-1}" = 1 ]; then
  [ -f "$REF" ] || $VGEN eval fid-ref --world shapes --resolution 128 --features shapes --n 10000 --out "$REF" > /dev/null
  QUALITY_ARGS=(--quality --fid-ref "$REF" --fid-samples "${FID_N:-1000}" --geneval-images-per-prompt "${GENEVAL_IPP:-4}"
                --samples-dir "$OUT/samples")
fi
bench() {  # bench NAME ARGS...
  local name=$1
  shift
  /usr/bin/time -f "bench $name %e s wall" $VGEN bench speculative --model "$TARGET" --threads "${OMP_NUM_THREADS}" \
      --repeats "${REPEATS:-3}" --batch-sizes 1 16 "${QUALITY_ARGS[@]}" --output "$OUT/bench_$name.json" \
      --plot "$OUT/bench_$name.png" "$@" > /dev/null
}
bench sjd --speculative sjd --set window=16
bench exact --speculative exact --drafter "$OUT/spec_drafter_128/final" --set gamma=4
# shellcheck disable=SC2086
bench lantern --speculative lantern --set window=16 pool_k=8 --sweep ${DELTAS:-0.1 0.3 0.5}
# shellcheck disable=SC2086
bench mulo_sd --speculative mulo-sd --drafter "$LOW" --set upsampler="$OUT/spec_upsampler/final" pool_k=8 radius=1 island_lag=1 \
    --sweep ${TAUS:-0.02 0.05 0.15}
$VGEN bench speculative --combine "$OUT"/bench_sjd.json "$OUT"/bench_exact.json "$OUT"/bench_lantern.json \
    "$OUT"/bench_mulo_sd.json --plot "$OUT/speed_quality.png" > /dev/null
echo "=== end $(date +%T); load $(cut -d' ' -f1-3 /proc/loadavg)"
