"""``vgen profile-heads``: the Forcing-KV head profile of a video model, written beside it.

    vgen profile-heads --model DIR                   # writes DIR/head_profile.json
    vgen profile-heads --model DIR --clips 16 --source real --out profile.json

The model first generates ``--clips`` clips of its training length (full cache, its saved sampling settings;
captions from the Moving Shapes world, seed ``--seed``), or with ``--source real`` encodes Moving Shapes renders;
then one teacher-forced pass per clip and profiling time measures each head's attention (see
:mod:`vgen.models.forcing_kv`). Deterministic for a fixed model and seed. Prints the per-layer split.
"""

from __future__ import annotations

import argparse
import json

from vgen.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile-heads",
        help="profile a video model's attention heads as static / dynamic (Forcing-KV), JSON beside the model",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", required=True, help="video pipeline folder (model_index.json)")
    parser.add_argument("--clips", type=int, default=8, help="clips to profile on (default 8)")
    parser.add_argument("--source", choices=("generated", "real"), default="generated",
                        help="the model's own clips (default) or encoded Moving Shapes renders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions, clips and noise (default 0)")
    parser.add_argument("--threshold", type=float, default=0.8, help="static iff the score is >= this (default 0.8)")
    parser.add_argument("--recent-frames", type=int, default=None,
                        help="key frames counted as recent (default: a block plus the frame before it)")
    parser.add_argument("--skip-frames", type=int, default=None,
                        help="first key frames left out as the sink (default: the model's saved sink_frames)")
    parser.add_argument("--out", default=None, help="profile JSON (default MODEL/head_profile.json)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from vgen.data.moving_shapes import MovingShapesWorld
    from vgen.models.forcing_kv import PROFILE_FILE, profile_heads
    from vgen.pipelines.video import load_video_pipeline

    if args.clips < 1:
        raise UserError(f"--clips must be >= 1, got {args.clips}")
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    pipe, model_dir = load_video_pipeline(args.model, args.device)
    transformer, autoencoder = pipe.transformer, pipe.autoencoder
    frames = transformer.config.max_frames
    H = autoencoder.downsample * transformer.config.latent_height
    world = MovingShapesWorld(H, frames, seed=args.seed, motion="directions", max_objects=2)
    samples = [world.sample(i) for i in range(args.clips)]
    captions = [s.caption for s in samples]
    if args.source == "generated":
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.clips)]
        latents = pipe(captions, num_frames=frames, generator=generators, output_type="latent", cache="full").frames
    else:
        video = torch.from_numpy(np.stack([s.frames for s in samples]))
        pixels = video.permute(0, 1, 4, 2, 3).flatten(0, 1).float().div(127.5).sub(1).to(pipe._execution_device())
        with torch.no_grad():
            latents = autoencoder.encode_latents(pixels.to(autoencoder.dtype), sample=False).float()
        latents = latents.view(args.clips, frames, *latents.shape[1:])
    cond, _ = pipe.encode_condition(captions, None, 1)
    skip = args.skip_frames if args.skip_frames is not None else pipe.sampling_defaults()["sink_frames"]
    profile = profile_heads(transformer, latents, cond, recent_frames=args.recent_frames, skip_frames=skip,
                            threshold=args.threshold, generator=torch.Generator().manual_seed(args.seed))
    profile.settings.update(source=args.source, seed=args.seed)
    out = Path(args.out) if args.out else model_dir / PROFILE_FILE
    profile.save(out)
    for layer in range(profile.num_layers):
        scores = ", ".join(f"{s:.2f}" for s in profile.scores[layer])
        print(f"layer {layer}: static {profile.static_heads(layer)} dynamic {profile.dynamic_heads(layer)} "
              f"(scores {scores})", file=sys.stderr)
    static, dynamic = profile.counts
    print(json.dumps({"profile": str(out), "static": static, "dynamic": dynamic}))
    return 0
