"""A short video from a block-causal video pipeline, block by block through its stream, with per-block timings.

    python examples/video_stream.py runs/video_sf/final "a red circle moving right" --frames 16 --out clip.gif
    python examples/video_stream.py runs/video_sf/final "a red circle moving right" --frames 32 \
        --cache sink_window --switch-at 16 "a red circle moving left" --out turn.png

`pipe.stream(...)` yields one `VideoBlock` per block of frames as soon as it is done: `.frames` (B, f, H, W, 3)
uint8, `.timings.denoise` / `.timings.commit` (the diffusion; seconds) and `.decode_seconds` (the autoencoder), and
`.elapsed` (seconds since the stream started). `stream.set_prompt` changes the prompt from the next block on. The
video uses the generator seeded `--seed`; every sampling option left out takes the model's saved setting. The output
is a .gif or a .png frame strip (.mp4 with the optional extra `pip install 'vgen[video]'`).
"""

import argparse

import numpy as np
import torch

from vgen.pipelines.video import load_video_pipeline
from vgen.video_io import save_video

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="folder saved by 'vgen train video'")
parser.add_argument("prompt", nargs="?", default="a red circle moving right")
parser.add_argument("--frames", type=int, default=None, help="a multiple of the block size (default: training length)")
parser.add_argument("--cache", default=None, help="full, sink_window or forcing_kv (default: the model's)")
parser.add_argument("--switch-at", nargs=2, default=None, metavar=("FRAME", "PROMPT"),
                    help="from frame FRAME on (a block boundary) follow PROMPT")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="clip.gif", help=".gif, .png (frame strip) or .mp4")
args = parser.parse_args()

pipe, _ = load_video_pipeline(args.model)  # on CUDA when there is one
frames = pipe.check_num_frames(args.frames)
if args.switch_at and not (args.switch_at[0].isdigit() and 0 < int(args.switch_at[0]) < frames
                           and int(args.switch_at[0]) % pipe.frames_per_block == 0):
    parser.error(f"--switch-at FRAME must be a block boundary inside the video (a multiple of "
                 f"{pipe.frames_per_block} below {frames})")
sampling = {"cache": args.cache} if args.cache else {}
stream = pipe.stream(args.prompt, num_frames=frames, generator=torch.Generator().manual_seed(args.seed),
                     **sampling)
blocks = []
for block in stream:
    f = block.frames.shape[1]
    print(f"block {block.index} frames {block.first_frame}-{block.first_frame + f - 1}: "
          f"denoise {block.timings.denoise:.4f} s, commit {block.timings.commit:.4f} s, "
          f"decode {block.decode_seconds:.4f} s, ready at {block.elapsed:.4f} s")
    blocks.append(block.frames[0])
    if args.switch_at and block.first_frame + f == int(args.switch_at[0]):
        stream.set_prompt(args.switch_at[1])

video = np.concatenate(blocks)  # (F, H, W, 3) uint8
caption = args.prompt + (f" | from frame {args.switch_at[0]}: {args.switch_at[1]}" if args.switch_at else "")
save_video([video], args.out, captions=[caption])
print(f"wrote {args.out} ({len(video)} frames of {video.shape[2]}x{video.shape[1]} px in {len(blocks)} blocks, "
      f"{len(video) / block.elapsed:.4g} frames/s)")
