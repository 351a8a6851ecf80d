#!/bin/bash
# The Moving Shapes video model end to end on CPU (2 cores) (LOCK=FILE: each heavy step under flock):
# per-frame KL autoencoder -> diffusion forcing -> self forcing -> head profile -> evaluation -> benchmark.
# Step counts default to what the run in README.md used (set from throughput probes on that machine); override them
# (AE_STEPS, DF_STEPS, SF_STEPS) to fit another budget. Outputs go to runs/.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
# LOCK=FILE runs each heavy step under flock FILE (machines shared by several jobs); unset = no lock
LOCK=${LOCK:+flock $LOCK}
C=configs/moving_shapes
$LOCK vgen train autoencoder --config $C/kl_autoencoder_32.yaml --out runs/kl_moving32 --set train.steps=${AE_STEPS:-2000}
$LOCK vgen train video --config $C/video_df.yaml --out runs/video_df --set train.steps=${DF_STEPS:-1500}
$LOCK vgen train video --config $C/video_sf.yaml --out runs/video_sf --set train.steps=${SF_STEPS:-250}
$LOCK vgen profile-heads --model runs/video_sf/final --clips 8
$LOCK vgen eval video --model runs/video_sf/final --videos 200 --out runs/video_eval > runs/video_eval.json
$LOCK vgen bench video --model runs/video_sf/final --output runs/bench_video.json
# ship it (fp16, a few MB) as the package's default video model:
#   python $C/ship_video_model.py runs/video_sf/final
