#!/usr/bin/env bash
# Train the default Shapes text-to-image model in one go: tokenizer, text VAR, a fine-tuning stage, the pipeline.
#
#   bash configs/shapes/train_default_model.sh OUT_DIR
#
# Writes OUT_DIR/tokenizer/, OUT_DIR/var/ (stage 1) and OUT_DIR/var_ft/ (stage 2: a fresh optimiser and a shorter
# schedule starting from stage 1's export), each a run folder with logs and checkpoints. OUT_DIR/var_ft/final/ is
# the pipeline folder `vgen generate --model` loads; configs/shapes/ship_default_model.py copies it into the package.
# The recipe is configs/shapes/default_model_{tokenizer,var}.yaml plus the stage-2 settings below; these
# environment variables override sizes for the machine at hand (defaults: the recipe as configs/shapes/README.md
# records it, without the shipped run's time limits):
#
#   TOK_STEPS, VAR_STEPS, FT_STEPS   optimiser steps of the tokenizer, stage 1 and stage 2
#   BATCH                  batch size per process of every run
#   WORKERS                data-loading processes (rendering a 64 px Shapes image takes 1-4 ms of one core)
#   PRECISION              fp32, bf16 or fp16 (mixed precision needs CUDA; CPU falls back to fp32)
#   LR_SCALE               multiplies every learning rate (e.g. 0.5 for half the batch)
#   MAX_SECONDS            stop each VAR stage after this many seconds of training (0: train all steps)
#   WORD_MIXING            task.text_word_mixing of both VAR stages (e.g. 3; the shipped model has none, see
#                          configs/shapes/README.md: its text encoder never learned word order)
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
VAR_SETS="$VAR_SETS train.max_seconds=${MAX_SECONDS:-0}"
[[ -n ${WORD_MIXING:-} ]] && VAR_SETS="$VAR_SETS task.text_word_mixing=$WORD_MIXING"
# Stage 2: from stage 1's export, peak rate 3e-4 after 100 warmup steps, 2500 steps, 14 data-loading processes.
FT_LR=$(python -c "print(3.0e-4 * ${LR_SCALE:-1})")
FT_SETS="train.lr=$FT_LR train.warmup_steps=100 train.steps=${FT_STEPS:-2500} train.ckpt_every=0"
FT_SETS="$FT_SETS train.keep_checkpoints=3 train.num_workers=${WORKERS:-14} train.max_seconds=${MAX_SECONDS:-0}"
[[ -n ${BATCH:-} ]] && FT_SETS="$FT_SETS train.batch_size=$BATCH"
[[ -n ${PRECISION:-} ]] && FT_SETS="$FT_SETS train.precision=$PRECISION"
[[ -n ${WORD_MIXING:-} ]] && FT_SETS="$FT_SETS task.text_word_mixing=$WORD_MIXING"

echo "== tokenizer (${TOK_SETS:-config as is})"
# shellcheck disable=SC2086  # the override list is word-split on purpose
$VGEN train tokenizer --config "$HERE/default_model_tokenizer.yaml" --out "$OUT/tokenizer" \
    ${TOK_SETS:+--set $TOK_SETS}
echo "== text VAR, stage 1 ($VAR_SETS)"
# shellcheck disable=SC2086
$VGEN train var --config "$HERE/default_model_var.yaml" --out "$OUT/var" \
    --set "task.tokenizer=$OUT/tokenizer/final" $VAR_SETS
echo "== text VAR, stage 2 ($FT_SETS)"
# shellcheck disable=SC2086
$VGEN train var --config "$HERE/default_model_var.yaml" --out "$OUT/var_ft" \
    --set "task.tokenizer=$OUT/tokenizer/final" "task.init_from=$OUT/var/final" $FT_SETS
echo "== done: pipeline in $OUT/var_ft/final"
echo "   try: vgen generate --model $OUT/var_ft/final \"a photo of a red circle\" --out out.png"
