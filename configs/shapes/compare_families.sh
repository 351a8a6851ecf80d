#!/usr/bin/env bash
# The family table of configs/shapes/README.md ("Every family on the Shapes world"): one small model per image family
# on the 64 px Shapes world, trained with the repository's own commands on a CPU budget, then Shapes-GenEval (553
# prompts x GENEVAL_IMAGES), Shapes-FID (FID_SAMPLES samples against 10 000 real renders) and sampling speed of all
# folders in one process, next to the shipped VAR model. The steps are those of the table's run: what a 40-step probe
# said fits in each budget on 2 shared CPU cores (raster VQ 12 min, raster AR 15, KL autoencoder 10, FlowAR 15,
# xAR 15 on FlowAR's autoencoder, FR-VAE 7, NFIG 9);
# the shared recipes keep their own steps, so they are set here.
#   bash configs/shapes/compare_families.sh              # everything (about 1.5 hours on 2 shared cores)
#   FAMILIES=flowar bash configs/shapes/compare_families.sh
# LOCK is the lock file ("" = no lock), VGEN the command (default: vgen on the PATH), OUT the folder (default runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
LOCK=${LOCK-}
VGEN=${VGEN:-vgen}
OUT=${OUT:-runs}
FID_SAMPLES=${FID_SAMPLES:-1000}
GENEVAL_IMAGES=${GENEVAL_IMAGES:-1}
FAMILIES=${FAMILIES:-raster flowar xar nfig}

heavy() {  # command... (under flock LOCK when LOCK is set)
    if [ -n "$LOCK" ]; then flock "$LOCK" "$@"; else "$@"; fi
}
train() {  # OUT_DIR TASK CONFIG --set ...: skipped when the export exists
    local dir=$1 task=$2 config=$3; shift 3
    [ -f "$dir/final/config.json" ] || [ -f "$dir/final/model_index.json" ] ||
        heavy "$VGEN" train "$task" --config "$config" --out "$dir" --no-progress "$@"
}
kl_autoencoder() {  # the KL autoencoder FlowAR and xAR share (trained once)
    train "$OUT/kl_shapes" autoencoder configs/shapes/kl_autoencoder.yaml --set train.steps=251 \
        train.sample_every=251 train.max_seconds=600
}
evaluate() {  # NAME PIPELINE_DIR
    local name=$1 model=$2 ev=$OUT/family_eval
    mkdir -p "$ev/$name"
    [ -f "$ev/shapes_ref_64.npz" ] ||
        heavy "$VGEN" eval fid-ref --world shapes --resolution 64 --features shapes --out "$ev/shapes_ref_64.npz"
    heavy "$VGEN" eval geneval --model "$model" --metadata shapes --images-per-prompt "$GENEVAL_IMAGES" \
        --out "$ev/$name/geneval" --batch-size 64 > "$ev/$name/geneval.json"
    heavy "$VGEN" sample --model "$model" --metadata shapes --num-samples "$FID_SAMPLES" --out "$ev/$name/fid_samples" \
        --batch-size 64
    heavy "$VGEN" eval fid --samples "$ev/$name/fid_samples" --ref "$ev/shapes_ref_64.npz" --features shapes \
        > "$ev/$name/fid.json"
}

models=(vgen/assets/default_model)
evaluate var_shipped vgen/assets/default_model
for family in $FAMILIES; do
    case $family in
    raster)
        train "$OUT/raster_vq" tokenizer configs/shapes/raster_vq.yaml --set train.steps=500
        train "$OUT/raster_s1_64" raster-ar configs/shapes/raster_s1_64.yaml --set train.steps=529 \
            train.sample_every=529 train.max_seconds=900 task.tokenizer="$OUT/raster_vq/final" \
            task.token_cache="$OUT/raster_tokens_64.pt"
        models+=("$OUT/raster_s1_64/final") ;;
    flowar)
        kl_autoencoder
        train "$OUT/flowar_shapes" flowar configs/shapes/flowar_text.yaml --set train.steps=992 \
            train.sample_every=992 train.max_seconds=900 task.autoencoder="$OUT/kl_shapes/final"
        models+=("$OUT/flowar_shapes/final") ;;
    xar)
        kl_autoencoder
        train "$OUT/xar_shapes" xar configs/shapes/xar_text.yaml --set train.steps=1200 \
            train.sample_every=1200 train.max_seconds=900 task.autoencoder="$OUT/kl_shapes/final"
        models+=("$OUT/xar_shapes/final") ;;
    nfig)
        train "$OUT/frvae_compare" tokenizer configs/shapes/frvae_compare.yaml --set train.steps=229 \
            train.sample_every=229 train.max_seconds=420
        train "$OUT/nfig_compare" var configs/shapes/var_nfig_compare.yaml --set train.steps=87 \
            train.sample_every=87 train.max_seconds=540 task.tokenizer="$OUT/frvae_compare/final"
        models+=("$OUT/nfig_compare/final") ;;
    *) echo "unknown family $family (raster, flowar, xar, nfig)" >&2; exit 2 ;;
    esac
    evaluate "$family" "${models[-1]}"
done
heavy "$VGEN" bench sample --model "${models[@]}" --batch-sizes 1,16 --output "$OUT/family_eval/bench.json"
