"""``vgen eval video``: a video model's quality on Moving Shapes per cache mode and rollout length (JSON).

    vgen eval video --model DIR --videos 200 --lengths 1,2,4 --out runs/video_eval

Generates ``--videos`` videos per (mode, length) from Moving Shapes captions and scores every frame with the exact
Shapes detector (caption adherence, identity persistence, motion adherence) and per-frame Shapes-FID against real
renders; see :mod:`vgen.eval.video_eval`. Prints one JSON line per row on stderr and the report on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from vgen.errors import UserError


def register_video_eval(sub) -> None:
    from vgen.cli.generate_video import add_video_sampling_args

    parser = sub.add_parser("video", help="video quality per KV cache and rollout length (Moving Shapes; JSON)",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="video pipeline folder saved by 'vgen train video' "
                        "(default: the shipped Moving Shapes model)")
    parser.add_argument("--videos", type=int, default=200, help="videos per mode and length (default 200)")
    parser.add_argument("--lengths", default="1,2,4", help="multiples of the training length (default 1,2,4)")
    parser.add_argument("--modes", default="full,sink_window,forcing_kv", help="comma-separated cache modes")
    parser.add_argument("--seed", type=int, default=0, help="video i uses seed + i (default 0)")
    parser.add_argument("--world-seed", type=int, default=1, help="Moving Shapes seed of the captions (default 1)")
    parser.add_argument("--batch-size", type=int, default=25, help="videos per pipeline call (default 25)")
    parser.add_argument("--workers", type=int, default=2, help="detector processes (default 2)")
    parser.add_argument("--out", default=None, help="folder for video_eval.json and frame strips")
    add_video_sampling_args(parser)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vgen.cli.generate_video import video_sampling_kwargs
    from vgen.eval.bench_video import MODES, _parse_list
    from vgen.eval.video_eval import evaluate_video_model
    from vgen.pipelines.video import load_video_pipeline

    modes = _parse_list(args.modes, str, "modes")
    if any(m not in MODES for m in modes):
        raise UserError(f"--modes must come from {', '.join(MODES)}, got {args.modes}")
    lengths = _parse_list(args.lengths, int, "lengths")
    if args.videos < 2 or min(lengths) < 1 or args.batch_size < 1 or args.workers < 1:
        raise UserError("--videos must be >= 2 (FID needs two) and --lengths, --batch-size, --workers >= 1")
    pipe, _ = load_video_pipeline(args.model, args.device)
    sampling = video_sampling_kwargs(args)
    sampling.pop("cache", None)  # the modes come from --modes
    with torch.no_grad():
        report = evaluate_video_model(pipe, args.videos, tuple(lengths), tuple(modes), args.seed, args.world_seed,
                                      args.batch_size, args.workers, args.out,
                                      log=lambda line: print(line, file=sys.stderr), **sampling)
    print(json.dumps(report, indent=2))
    return 0
