#!/usr/bin/env bash
# Train the default Shapes text-to-image model in one go: tokenizer, text VAR in four stages, the pipeline.
#
#   bash configs/shapes/train_default_model.sh OUT_DIR
#
# Writes run folders (logs, checkpoints, final/ export) OUT_DIR/tokenizer/, OUT_DIR/var/ (stage 1), OUT_DIR/var_ft/
# (stage 2: a fresh optimiser and a shorter schedule from stage 1's export), OUT_DIR/var_binding/ (stage 3: word
# mixing added to the text encoder, only the text path trained, mostly on the coarse scales) and OUT_DIR/var_final/
# (stage 4: every weight, captions weighted towards the failing tasks). OUT_DIR/var_final/final/ is the pipeline
# folder `vgen generate --model` loads; configs/shapes/ship_default_model.py copies it into the package. The recipe
# is configs/shapes/default_model_{tokenizer,var}.yaml, the stage-2 settings below, var_text_binding_ft.yaml and
# default_model_var_final.yaml; these environment variables override sizes for the machine at hand (defaults: the
# recipe as configs/shapes/README.md records it, without the shipped run's time limits):
#
#   TOK_STEPS, VAR_STEPS, FT_STEPS, BIND_STEPS, FINAL_STEPS   optimiser steps of the tokenizer and stages 1-4
#   BATCH                  batch size per process of every run
#   WORKERS                data-loading processes (rendering a 64 px Shapes image takes 1-4 ms of one core)
#   PRECISION              fp32, bf16 or fp16 (mixed precision needs CUDA; CPU falls back to fp32)
#   LR_SCALE               multiplies every learning rate (e.g. 0.5 for half the batch)
#   MAX_SECONDS            stop each VAR stage after this many seconds of training (0: train all steps)
#   WORD_MIXING            task.text_word_mixing of stages 1 and 2 too (e.g. 3; in the shipped model word mixing
#                          starts at stage 3, see configs/shapes/README.md)
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
# Stages 3 and 4: their own configs; the machine-size overrides apply to them as well.
LATE_SETS="train.max_seconds=${MAX_SECONDS:-0}"
[[ -n ${BATCH:-} ]] && LATE_SETS="$LATE_SETS train.batch_size=$BATCH"
[[ -n ${WORKERS:-} ]] && LATE_SETS="$LATE_SETS train.num_workers=$WORKERS"
[[ -n ${PRECISION:-} ]] && LATE_SETS="$LATE_SETS train.precision=$PRECISION"
BIND_SETS="$LATE_SETS train.lr=$(python -c "print(3.0e-4 * ${LR_SCALE:-1})")"
[[ -n ${BIND_STEPS:-} ]] && BIND_SETS="$BIND_SETS train.steps=$BIND_STEPS"
FINAL_SETS="$LATE_SETS train.lr=$(python -c "print(3.0e-4 * ${LR_SCALE:-1})")"
[[ -n ${FINAL_STEPS:-} ]] && FINAL_SETS="$FINAL_SETS train.steps=$FINAL_STEPS"
echo "== text VAR, stage 3: word order ($BIND_SETS)"
# shellcheck disable=SC2086
$VGEN train var --config "$HERE/var_text_binding_ft.yaml" --out "$OUT/var_binding" \
    --set "task.tokenizer=$OUT/tokenizer/final" "task.init_from=$OUT/var_ft/final" $BIND_SETS
echo "== text VAR, stage 4: every weight ($FINAL_SETS)"
# shellcheck disable=SC2086
$VGEN train var --config "$HERE/default_model_var_final.yaml" --out "$OUT/var_final" \
    --set "task.tokenizer=$OUT/tokenizer/final" "task.init_from=$OUT/var_binding/final" $FINAL_SETS
echo "== done: pipeline in $OUT/var_final/final"
echo "   try: vgen generate --model $OUT/var_final/final \"a photo of a red circle\" --out out.png"
