#!/bin/bash
# The Moving Shapes video model end to end on CPU (2 cores) (LOCK=FILE: each heavy step under flock):
# per-frame KL autoencoder -> diffusion forcing (two runs: a first one, then a longer one that continues from its
# weights on a fresh schedule) -> self forcing -> head profile -> evaluation -> benchmark -> ship.
# Step counts default to the run of the shipped model (vgen/assets/default_video_model; times in README.md); override
# them (AE_STEPS, DF_STEPS, DF2_STEPS, SF_STEPS; DF2_STEPS=0 skips the second run) to fit another budget.
# Outputs go to runs/.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
# LOCK=FILE runs each heavy step under flock FILE (machines shared by several jobs); unset = no lock
LOCK=${LOCK:+flock $LOCK}
C=configs/moving_shapes
$LOCK vgen train autoencoder --config $C/kl_autoencoder_32.yaml --out runs/kl_moving32 --set train.steps=${AE_STEPS:-639}
$LOCK vgen train video --config $C/video_df.yaml --out runs/video_df --set train.steps=${DF_STEPS:-1000}
DF=runs/video_df/final
if [ "${DF2_STEPS:-4500}" != 0 ]; then
  $LOCK vgen train video --config $C/video_df.yaml --out runs/video_df2 --set train.steps=${DF2_STEPS:-4500} \
      train.lr=4.0e-4 train.warmup_steps=50 task.init_from=$DF
  DF=runs/video_df2/final
fi
$LOCK vgen train video --config $C/video_sf.yaml --out runs/video_sf --set train.steps=${SF_STEPS:-100} task.init_from=$DF
$LOCK vgen profile-heads --model runs/video_sf/final --clips 8
$LOCK vgen eval video --model runs/video_sf/final --videos 200 --lengths 1,2,4 --out runs/video_eval > runs/video_eval.json
$LOCK vgen bench video --model runs/video_sf/final --output runs/bench_video.json
# ship it (fp16, a few MB) as the package's default video model, its card's scores from the evaluation:
#   python $C/ship_video_model.py runs/video_sf/final --eval runs/video_eval.json
