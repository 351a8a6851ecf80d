#!/usr/bin/env bash
# Trains and measures the raster AR / Token-Shuffle comparison of configs/shapes/README.md: the tokenizer
# (raster_vq.yaml), then for every run named on the command line (default: all six) training, Shapes-GenEval
# (553 prompts x 4 images) and Shapes-FID (5000 samples against 10 000 real renders). With LOCK=FILE each heavy
# command takes that lock on its own (flock), so other jobs can run between them; times go to runs/<name>.time.
#   bash configs/shapes/train_raster.sh                      # everything
#   bash configs/shapes/train_raster.sh raster_s2_64          # one run (the tokenizer must exist)
# FID_SAMPLES / GENEVAL_IMAGES (per prompt) make the evaluation smaller, TRAIN_SET overrides config values of every
# generator run (e.g. TRAIN_SET="train.steps=1000 train.max_seconds=3600": the same steps for every run whatever the
# load on the machine), LOCK is the lock file ("" = no lock), VGEN the command (default: vgen on the PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
LOCK=${LOCK-}
VGEN=${VGEN:-vgen}
FID_SAMPLES=${FID_SAMPLES:-5000}
GENEVAL_IMAGES=${GENEVAL_IMAGES:-4}
read -r -a TRAIN_SET <<< "${TRAIN_SET:-}"
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(raster_s1_64 raster_s2_64 raster_s4_64 raster_s1_128 raster_s2_128 raster_s4_128)

heavy() {  # name-of-the-time-file command...
    local log=$1; shift
    if [ -n "$LOCK" ]; then set -- flock "$LOCK" "$@"; fi
    /usr/bin/time -f "%e s wall: ${*: -8}" -a -o "runs/$log.time" "$@"
}

mkdir -p runs/eval
if [ ! -f runs/raster_vq/final/config.json ]; then
    heavy raster_vq "$VGEN" train tokenizer --config configs/shapes/raster_vq.yaml --out runs/raster_vq --no-progress
fi
for name in "${RUNS[@]}"; do
    res=${name##*_}
    ref=runs/eval/shapes_fid_ref_${res}.npz
    mkdir -p "runs/eval/$name"
    [ -f "runs/$name/final/model_index.json" ] ||
        heavy "$name" "$VGEN" train raster-ar --config "configs/shapes/$name.yaml" --out "runs/$name" --no-progress \
            ${TRAIN_SET[@]+--set "${TRAIN_SET[@]}"}
    heavy "$name" "$VGEN" eval geneval --metadata shapes --images-per-prompt "$GENEVAL_IMAGES" --model "runs/$name/final" \
        --out "runs/eval/$name/geneval" --batch-size 64 > "runs/eval/$name/geneval.json"
    heavy "$name" "$VGEN" sample --model "runs/$name/final" --metadata shapes --num-samples "$FID_SAMPLES" \
        --out "runs/eval/$name/fid_samples" --batch-size 64
    [ -f "$ref" ] || heavy "$name" "$VGEN" eval fid-ref --world shapes --resolution "$res" --features shapes --out "$ref"
    heavy "$name" "$VGEN" eval fid --samples "runs/eval/$name/fid_samples" --ref "$ref" --features shapes \
        > "runs/eval/$name/fid.json"
done
