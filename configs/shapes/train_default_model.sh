#!/usr/bin/env bash
# Train the default Shapes text-to-image model in one go: tokenizer, then text VAR, then the exported pipeline.
#
#   bash configs/shapes/train_default_model.sh OUT_DIR
#
# Writes OUT_DIR/tokenizer/ and OUT_DIR/var/ (runs with logs, sample grids and checkpoints); OUT_DIR/var/final/ is
# the exported pipeline folder, what `vgen generate --model` loads and what ships in vgen/assets/default_model.
# The recipe is configs/shapes/default_model_{tokenizer,var}.yaml; these environment variables override its size for
# the machine at hand (defaults: the configs' own values, the CPU run that configs/shapes/README.md records):
#
#   TOK_STEPS, VAR_STEPS   optimiser steps of each run
#   BATCH                  batch size per process of both runs
#   WORKERS                data-loading processes (rendering a 64 px Shapes image takes 1-4 ms of one core)
#   PRECISION              fp32, bf16 or fp16 (mixed precision needs CUDA; CPU falls back to fp32)
#   LR_SCALE               multiplies both learning rates (e.g. 2 for twice the batch)
#
# Example for one GPU (the run configs/shapes/README.md proposes):
#   TOK_STEPS=6000 VAR_STEPS=30000 BATCH=64 WORKERS=12 PRECISION=bf16 LR_SCALE=1.4 bash ... runs/default_model
set -euo pipefail

OUT=${1:?usage: bash configs/shapes/train_default_model.sh OUT_DIR}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VGEN=${VGEN:-"python -m vgen"}

overrides() {  # $1 = config file: the --set list for the environment variables that are set
    local lr
    lr=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['train']['lr'])" "$1")
    local sets=()
    [[ -n ${BATCH:-} ]] && sets+=("train.batch_size=$BATCH")
    [[ -n ${WORKERS:-} ]] && sets+=("train.num_workers=$WORKERS")
    [[ -n ${PRECISION:-} ]] && sets+=("train.precision=$PRECISION")
    [[ -n ${LR_SCALE:-} ]] && sets+=("train.lr=$(python -c "print($lr * $LR_SCALE)")")
    echo "${sets[@]}"
}

TOK_SETS=$(overrides "$HERE/default_model_tokenizer.yaml")
VAR_SETS=$(overrides "$HERE/default_model_var.yaml")
[[ -n ${TOK_STEPS:-} ]] && TOK_SETS="$TOK_SETS train.steps=$TOK_STEPS"
[[ -n ${VAR_STEPS:-} ]] && VAR_SETS="$VAR_SETS train.steps=$VAR_STEPS"

echo "== tokenizer (${TOK_SETS:-config as is})"
# shellcheck disable=SC2086  # the override list is word-split on purpose
$VGEN train tokenizer --config "$HERE/default_model_tokenizer.yaml" --out "$OUT/tokenizer" \
    ${TOK_SETS:+--set $TOK_SETS}
echo "== text VAR (${VAR_SETS:-config as is})"
# shellcheck disable=SC2086
$VGEN train var --config "$HERE/default_model_var.yaml" --out "$OUT/var" \
    --set "task.tokenizer=$OUT/tokenizer/final" $VAR_SETS
echo "== done: pipeline in $OUT/var/final (try: vgen generate --model $OUT/var/final \"a photo of a red circle\")"
