"""``vgen generate-video``: a video from a saved video pipeline, as .mp4, .gif or a .png frame strip.

    vgen generate-video "a red circle moving right" --frames 48 --out clip.mp4      # the shipped model
    vgen generate-video --model runs/video_sf/final "a red circle moving right" --out clip.gif
    vgen generate-video --model M "a red circle moving right" --frames 64 --cache forcing_kv --out clip.gif
    vgen generate-video --model M "a red circle moving right" --switch-at 24 "a red circle moving left" --out turn.png

``--model`` is a folder saved by ``vgen train video``; without it the Moving Shapes model shipped in the package
(``vgen/assets/default_video_model``) is used. Video i of ``--n`` uses seed ``--seed + i``. The
resolved settings are written beside the output (``clip.json``). Every sampling flag left out takes the model's
saved setting. ``.mp4`` needs the optional extra ``pip install 'vgen[video]'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vgen.errors import UserError


def add_video_sampling_args(parser: argparse.ArgumentParser) -> None:
    """One flag per video sampling option (vgen.pipelines.registry.VIDEO_OPTIONS), default None = the model's."""
    from vgen.pipelines.registry import VIDEO_OPTIONS

    for option in VIDEO_OPTIONS:
        parser.add_argument(option.cli_flag, default=None, metavar=option.metavar,
                            help=f"{option.help} (default: the model's saved setting)")


def video_sampling_kwargs(args: argparse.Namespace) -> dict:
    """The video sampling flags that were given (the pipeline checks them)."""
    from vgen.pipelines.registry import VIDEO_OPTIONS

    return {o.name: getattr(args, o.name) for o in VIDEO_OPTIONS if getattr(args, o.name) is not None}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate-video",
        help="generate a video from a saved video pipeline (.mp4, .gif or .png frame strip)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("prompt", help="the prompt, e.g. 'a red circle moving right' (quote it)")
    parser.add_argument("--model", default=None,
                        help="video pipeline folder saved by 'vgen train video' "
                        "(default: the shipped Moving Shapes model)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames to generate, a multiple of the model's block size (default: its training length)")
    parser.add_argument("--n", type=int, default=1, help="videos, shown side by side (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="video i uses seed + i (default 0)")
    parser.add_argument("--switch-at", nargs=2, action="append", default=[], metavar=("FRAME", "PROMPT"),
                        help="from frame FRAME on (a block boundary) follow PROMPT; may be repeated")
    parser.add_argument("--out", default="clip.mp4", help="output .mp4, .gif or .png (default clip.mp4)")
    parser.add_argument("--fps", type=float, default=8.0, help="frames per second of .mp4 / .gif (default 8)")
    parser.add_argument("--scale", type=int, default=4, help="enlarge frames this many times (default 4)")
    add_video_sampling_args(parser)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def _switches(args: argparse.Namespace, frames: int, block: int) -> dict[int, str]:
    switches = {}
    for frame_text, prompt in args.switch_at:
        try:
            frame = int(frame_text)
        except ValueError:
            raise UserError(f"--switch-at takes FRAME PROMPT with FRAME a number, got {frame_text!r}") from None
        if frame <= 0 or frame >= frames or frame % block:
            raise UserError(f"--switch-at {frame}: the prompt can change at a block boundary inside the video "
                            f"(a multiple of {block} between {block} and {frames - block})")
        switches[frame] = prompt
    return switches


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vgen.pipelines.video import load_video_pipeline
    from vgen.video_io import VIDEO_SUFFIXES, save_video

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"--out must end in {', '.join(VIDEO_SUFFIXES)}, got {args.out}")
    pipe, model_dir = load_video_pipeline(args.model, args.device)
    sampling = video_sampling_kwargs(args)
    frames = pipe.check_num_frames(args.frames)
    switches = _switches(args, frames, pipe.frames_per_block)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.n)]
    stream = pipe.stream(args.prompt, num_frames=frames, num_videos_per_prompt=args.n, generator=generators,
                         **sampling)
    blocks = []
    for block in stream:
        blocks.append(block.frames)
        next_frame = block.first_frame + pipe.frames_per_block
        if next_frame in switches:
            stream.set_prompt(switches[next_frame])
    videos = list(np.concatenate(blocks, axis=1))  # per video (F, H, W, 3) uint8
    captions = [args.prompt + "".join(f" | from frame {f}: {p}" for f, p in sorted(switches.items()))] * args.n
    save_video(videos, out, fps=args.fps, scale=args.scale, captions=captions)
    settings = {"model": str(model_dir.resolve()), "prompt": args.prompt, "frames": frames, "n": args.n,
                "seed": args.seed, "switch_at": {str(k): v for k, v in sorted(switches.items())},
                **pipe.resolve_sampling(**sampling)}
    out.with_suffix(".json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {out} ({args.n} video(s) of {frames} frames)")
    return 0
