"""``vgen stream``: serve the live video demo (one page + a websocket that streams JPEG frames block by block).

    vgen stream                                  # the shipped Moving Shapes model on http://127.0.0.1:8000
    vgen stream --model runs/video_sf/final      # a video model you trained
    vgen stream --model runs/video_sf/final --port 8080 --max-viewers 8

Open the printed address in a browser: a prompt box, start / stop, the cache mode, SDVG on / off with its threshold,
and readouts of generation FPS, delivered FPS and first-frame latency. It binds to 127.0.0.1 unless ``--host`` says
otherwise. Needs the optional extra ``pip install 'vgen[stream]'`` (FastAPI, uvicorn, websockets).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from vgen.errors import UserError

EXTRA_MODULES = ("fastapi", "uvicorn", "websockets")


def register(subparsers) -> None:
    parser = subparsers.add_parser("stream", help="serve the live video demo in the browser (FastAPI + websocket)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="video pipeline folder saved by 'vgen train video' "
                        "(default: the shipped Moving Shapes model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-viewers", type=int, default=4, help="viewers at once; one more is refused (default 4)")
    parser.add_argument("--draft-steps", type=int, default=1,
                        help="SDVG's drafter: the model with this many steps per block (default 1)")
    parser.add_argument("--tau", type=float, default=0.3, help="the page's initial SDVG threshold (default 0.3)")
    parser.add_argument("--scorer", default="moving_shapes",
                        help="SDVG frame scorer: 'moving_shapes' (caption adherence by the exact Shapes detector), "
                             "'moving_shapes_colours' (the captioned colours only, cheaper) or module:factory "
                             "returning scorer(frames, prompts) -> (B, f) scores")
    parser.add_argument("--full-cache-frames", type=int, default=None,
                        help="length of a stream on the full cache (default: 4x the model's training length)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def check_extra() -> None:
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"vgen stream needs the optional extra 'stream' ({', '.join(missing)} missing): "
                        "pip install 'vgen[stream]'")


def run(args: argparse.Namespace) -> int:
    check_extra()
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    import uvicorn

    from vgen.eval.video_scorers import load_frame_scorer
    from vgen.pipelines.video import load_video_pipeline
    from vgen.stream.app import StreamSettings, create_app

    settings = StreamSettings(max_sessions=args.max_viewers, draft_steps=args.draft_steps, default_tau=args.tau,
                              scorer=load_frame_scorer(args.scorer), full_cache_frames=args.full_cache_frames)
    pipe, model_dir = load_video_pipeline(args.model, args.device)
    app = create_app(pipe, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vgen stream: warning: binding {args.host}: other machines can reach this demo", file=sys.stderr)
    print(f"vgen stream: {model_dir} on http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws="auto",
                ws_max_size=1 << 20)
    return 0
