"""Speed and memory of block-causal video generation per KV cache, in one run (``vgen bench video``).

For each cache mode (full, sink + rolling window, Forcing-KV) and each rollout length (``--lengths`` multiples of
the model's training length) the model streams ``--videos`` videos block by block with its saved sampling settings
(or the given ones), after one untimed warm-up clip per mode. Per run:

* **generation FPS**: latent frames x decoder frames per latent frame (1: the autoencoder works per frame) over the
  diffusion time (every block's denoising passes and clean cache pass; the decoder excluded, as Forcing-KV and
  Self-Forcing count it);
* **delivered FPS** and **first-frame latency**: frames over the wall clock from the request to the last decoded
  block, and the wall clock to the first decoded block;
* **cache bytes per frame**: the keys and values the cache holds at the end of the rollout over the frames
  generated, and the bytes the cache allocated;
* ratios against the full cache at the same length, measured in this process (``speedup``, ``cache_reduction``).

Times are CUDA-synchronised wall clock when a GPU is used; on CPU they are meaningful only as ratios between the
modes of one run. One JSON object on stdout.

With ``--sdvg`` it benchmarks SDVG quality routing instead (:mod:`vgen.eval.bench_video_sdvg`): acceptance, speedup
and quality against target-only and draft-only generation, swept over ``--tau``, and a speed-quality plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

MODES = ("full", "sink_window", "forcing_kv")


#: flags of the cache-mode benchmark and their defaults (None in the parser: given with --sdvg they are an error)
CACHE_FLAGS = {"modes": ",".join(MODES), "lengths": "1,2,4", "prompt": "a red circle moving right and a blue square "
               "moving up", "repeats": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vgen.eval import bench_video_sdvg

    parser.add_argument("--model", default=None, help="video pipeline folder (default: the shipped video model)")
    parser.add_argument("--videos", type=int, default=None,
                        help="videos per stream batch (default 1); with --sdvg: videos per variant (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of video i is seed + i")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    group = parser.add_argument_group("cache modes (without --sdvg)")
    group.add_argument("--modes", default=None, help="comma-separated cache modes (default: all three)")
    group.add_argument("--lengths", default=None,
                       help="rollout lengths as multiples of the training length (default 1,2,4)")
    group.add_argument("--prompt", default=None,
                       help=f"the prompt of every video (default {CACHE_FLAGS['prompt']!r})")
    group.add_argument("--repeats", type=int, default=None,
                       help="timed runs per case, the fastest reported (default 1)")
    bench_video_sdvg.add_arguments(parser)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_flag_groups(args) -> None:
    """Flags of the other benchmark than the one chosen are an error (not silently ignored); fills the defaults."""
    from vgen.errors import UserError
    from vgen.eval.bench_video_sdvg import SDVG_FLAGS

    sdvg = bool(getattr(args, "sdvg", False))
    if sdvg:
        given = [_flag(n) for n in CACHE_FLAGS if getattr(args, n, None) is not None]
        if given:
            raise UserError(f"{', '.join(given)} set up the cache-mode benchmark; leave them out with --sdvg")
        args.videos = 8 if getattr(args, "videos", None) is None else args.videos
        return
    given = [_flag(n) for n in SDVG_FLAGS if getattr(args, n, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)} set up the SDVG benchmark; add --sdvg")
    for name, default in CACHE_FLAGS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if getattr(args, "videos", None) is None:
        args.videos = 1


def _parse_list(text: str, kind, what: str):
    from vgen.errors import UserError

    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise UserError(f"--{what} is empty")
    return values


def measure(pipe, mode: str, num_frames: int, videos: int, prompt: str, seed: int) -> dict:
    """One streamed rollout of ``videos`` videos with cache ``mode``; the measurements of the module doc."""
    import torch

    generators = [torch.Generator().manual_seed(seed + i) for i in range(videos)]
    start = time.perf_counter()
    stream = pipe.stream(prompt, num_frames=num_frames, num_videos_per_prompt=videos, generator=generators,
                         cache=mode)
    diffusion = decode = 0.0
    first = None
    for block in stream:
        diffusion += block.timings.total
        decode += block.decode_seconds
        if first is None:
            first = time.perf_counter() - start
    wall = time.perf_counter() - start
    cache = stream.sampler.cache
    frames = num_frames  # per stream; every video of the batch is one stream
    return {
        "mode": mode,
        "frames": frames,
        "videos": videos,
        "diffusion_seconds": diffusion,
        "decode_seconds": decode,
        "wall_seconds": wall,
        "generation_fps": frames * 1 / diffusion,
        "delivered_fps": frames / wall,
        "first_frame_latency_seconds": first,
        "cache_bytes_per_frame": cache.history_nbytes / videos / frames,
        "cache_history_bytes": cache.history_nbytes,
        "cache_allocated_bytes": cache.nbytes,
    }


def run(args) -> int:
    import torch

    from vgen.errors import UserError
    from vgen.pipelines.video import load_video_pipeline

    _check_flag_groups(args)
    if getattr(args, "sdvg", False):
        from vgen.eval import bench_video_sdvg

        return bench_video_sdvg.run(args)
    modes = _parse_list(args.modes, str, "modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown cache mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    lengths = _parse_list(args.lengths, int, "lengths")
    if min(lengths) < 1 or args.videos < 1 or args.repeats < 1:
        raise UserError("--lengths entries, --videos and --repeats must be >= 1")
    pipe, model_dir = load_video_pipeline(args.model, args.device)
    if "forcing_kv" in modes and pipe.head_profile is None:
        raise UserError(f"{model_dir} has no head_profile.json, which the forcing_kv cache needs: run 'vgen "
                        f"profile-heads --model {model_dir}' or leave forcing_kv out of --modes")
    base = pipe.transformer.config.max_frames
    device = pipe._execution_device()
    results = []
    with torch.no_grad():
        for mode in modes:  # warm-up: kernels, allocations
            measure(pipe, mode, pipe.frames_per_block * 2, args.videos, args.prompt, args.seed)
        for length in lengths:
            row = {}
            for mode in modes:
                runs = [measure(pipe, mode, base * length, args.videos, args.prompt, args.seed)
                        for _ in range(args.repeats)]
                row[mode] = min(runs, key=lambda r: r["diffusion_seconds"])
                row[mode]["length_multiple"] = length
            if "full" in row:
                for mode, r in row.items():
                    r["speedup_vs_full"] = row["full"]["diffusion_seconds"] / r["diffusion_seconds"]
                    r["cache_reduction_vs_full"] = 1 - r["cache_history_bytes"] / row["full"]["cache_history_bytes"]
            results.extend(row.values())
    report = {
        "benchmark": "video",
        "model": str(model_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "training_frames": base,
        "frames_per_block": pipe.frames_per_block,
        "sampling": pipe.resolve_sampling(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
