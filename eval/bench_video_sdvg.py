"""SDVG quality routing against target-only and draft-only video generation, in one run (``vgen bench video --sdvg``).

Variants: ``target-only`` (the model with its saved sampling), ``draft-only`` (the drafter alone: ``--drafter DIR``,
another video pipeline on the same latent space and block size, or this model with ``--draft-steps N`` steps per
block) and ``sdvg tau=T`` for every threshold of ``--tau`` (:class:`vgen.samplers.sdvg.SDVGRouter` through
:meth:`vgen.pipelines.video.VideoPipeline.stream`: the first block from the target, every later block drafted,
decoded and scored frame by frame, kept when its worst-frame score >= tau; ``-inf`` keeps every draft, ``inf``
none, and then the videos are the target-only videos of the same seeds).

Captions: ``--videos`` Moving Shapes captions (``--world-seed``, the world :mod:`vgen.eval.video_eval` draws from),
video i with seed ``seed + i``, ``--frames`` frames each; every variant generates the same videos, ``--batch-size``
at a time. One round per batch: the variants are called one after another on that batch (after one untimed warm-up
call each), so load from other processes hits every variant alike. Per variant:

* **speed**: wall seconds per video from the request to the last decoded frame (denoising, the router's draft
  decoding and scoring, the autoencoder), split into ``diffusion`` (denoising + cache passes), ``routing`` (draft
  decode + scorer) and ``decode``; ``speedup`` = the median over rounds of target-only seconds / the variant's in
  that round (``speedup_total``: the ratio of the sums; ``speedup_diffusion``: of the diffusion seconds alone, what
  routing would give with the scorer and the decoder off the critical path);
* **routing**: acceptance rate (accepted drafts over drafted blocks, the first block is never drafted), the
  blocks the target denoised (a block counts once for the batch) and the mean worst-frame score of the drafts;
* **quality** (:mod:`vgen.eval.video_metrics`): caption adherence, identity persistence and motion adherence from
  the exact detector on every frame, per-frame Shapes-FID against the frames of real renders of the same captions'
  videos (``real_fid_floor``: a second, disjoint set of real renders against them: the bias at this sample count),
  the ratio and delta against target-only, and how far the videos are from target-only's (mean absolute uint8
  difference, and whether every frame is identical).

The plot (``--plot``, :func:`vgen.eval.speed_quality_plot.plot_speed_quality`) shows caption adherence and per-frame
Shapes-FID against the speedup. Times are CUDA-synchronised when a GPU is used; on CPU they are meaningful only as
ratios within the run. One JSON object on stdout (``--output``: also to a file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the panels of the plot: (key of the quality rows, title)
PLOT_METRICS = (("caption_adherence", "caption adherence (higher is better)"),
                ("shapes_fid", "per-frame Shapes-FID (lower is better)"))
#: flags that only the SDVG benchmark reads (their defaults are None: given without --sdvg they are an error)
SDVG_FLAGS = ("tau", "drafter", "draft_steps", "frames", "batch_size", "cache", "scorer", "world_seed", "workers",
              "plot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDVG routing (with --sdvg)")
    group.add_argument("--sdvg", action="store_true",
                       help="benchmark SDVG quality routing against target-only and draft-only generation instead of "
                            "the cache modes")
    group.add_argument("--tau", default=None,
                       help="comma-separated thresholds on the worst-frame score to sweep; -inf keeps every draft, "
                            "inf none (write --tau=-inf,0.3,inf when the list starts with a minus sign)")
    group.add_argument("--drafter", default=None, metavar="DIR",
                       help="drafter video pipeline folder (same latent space and block size); default: this model "
                            "with --draft-steps steps")
    group.add_argument("--draft-steps", type=int, default=None, metavar="N",
                       help="the drafter is this model with N denoising steps per block (default 1 without --drafter)")
    group.add_argument("--frames", type=int, default=None,
                       help="frames per video (default: the model's training length)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="videos per call, one timed round each (default: min(--videos, 4))")
    group.add_argument("--cache", default=None, choices=("full", "sink_window", "forcing_kv"),
                       help="KV cache of every variant (default: the model's saved one)")
    group.add_argument("--scorer", default=None, metavar="SPEC",
                       help="per-frame scorer: moving_shapes (the exact detector's caption adherence, default), "
                            "moving_shapes_colours (the captioned colours only) or module:factory")
    group.add_argument("--world-seed", type=int, default=None,
                       help="seed of the Moving Shapes world the captions and real renders come from (default 1)")
    group.add_argument("--workers", type=int, default=None,
                       help="processes for the detector metrics (default 1)")
    group.add_argument("--plot", default=None, metavar="PNG", help="write the speed-quality plot here")


def parse_taus(text: str) -> list[float]:
    """``"-inf,0.3,inf"`` -> thresholds in descending order (duplicates dropped); NaN and empty lists are errors."""
    from vgen.errors import UserError

    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UserError("--tau is empty: give one or more thresholds, e.g. --tau=-inf,0.3,inf")
    taus = []
    for item in items:
        try:
            tau = float(item)
        except ValueError:
            raise UserError(f"--tau takes numbers, -inf or inf, got {item!r}") from None
        if math.isnan(tau):
            raise UserError("--tau takes numbers, -inf or inf, not NaN")
        taus.append(tau)
    return sorted(set(taus), reverse=True)


def tau_label(tau: float) -> str:
    return f"sdvg tau={tau:g}"


def json_safe(value):
    """``value`` with infinities as the strings ``"inf"`` / ``"-inf"`` and NaN as None (strict JSON)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class Variant:
    """One compared setting: ``label``, and ``tau`` for an SDVG setting (None: target-only or draft-only)."""

    label: str
    tau: float | None = None
    walls: list[float] = field(default_factory=list)
    diffusion: float = 0.0
    routing: float = 0.0
    decode: float = 0.0
    drafted: int = 0
    accepted: int = 0
    target_blocks: int = 0
    blocks: int = 0
    scores: list[float] = field(default_factory=list)
    videos: list = field(default_factory=list)


@dataclass
class Setup:
    """What every call of a run shares: the target ``pipe``, the drafter (``drafter_pipe`` or ``draft_steps``), the
    ``scorer`` and the ``sampling`` options given to every variant (the cache)."""

    pipe: object
    drafter_pipe: object
    draft_steps: int | None
    scorer: object
    sampling: dict

    def stream(self, variant: Variant, captions: list[str], seeds: list[int], frames: int):
        """A :class:`~vgen.pipelines.video.VideoStream` of ``variant`` for ``captions`` (video i: ``seeds[i]``)."""
        import torch

        from vgen.pipelines.video import SDVGOptions

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if variant.label == "draft-only":
            if self.drafter_pipe is not None:
                return self.drafter_pipe.stream(captions, num_frames=frames, generator=generators, **self.sampling)
            return self.pipe.stream(captions, num_frames=frames, generator=generators, num_steps=self.draft_steps,
                                    **self.sampling)
        sdvg = None
        if variant.tau is not None:
            sdvg = SDVGOptions(tau=variant.tau, draft_steps=self.draft_steps or 1, drafter=self.drafter_pipe,
                               scorer=self.scorer)
        return self.pipe.stream(captions, num_frames=frames, generator=generators, sdvg=sdvg, **self.sampling)


def generate(setup: Setup, variant: Variant, captions: list[str], seeds: list[int], frames: int,
             record: bool = True):
    """Generate ``captions`` with ``variant``; when ``record``, add its times, counts and uint8 videos
    (B, F, H, W, 3) to it. Returns the wall seconds."""
    import numpy as np
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        stream = setup.stream(variant, captions, seeds, frames)
        blocks = list(stream)
    wall = time.perf_counter() - start
    if not record:
        return wall
    variant.walls.append(wall)
    for block in blocks:
        variant.diffusion += block.timings.total
        variant.routing += getattr(block.timings, "routing", 0.0)
        variant.decode += block.decode_seconds
    variant.blocks += len(blocks)
    router = stream.sdvg
    if router is not None:
        stats = router.stats
        variant.drafted += stats.drafted
        variant.accepted += stats.accepted
        variant.target_blocks += stats.target_blocks
        variant.scores.extend(stats.scores)
    elif variant.label == "target-only":
        variant.target_blocks += len(blocks)
    variant.videos.append(np.concatenate([block.frames for block in blocks], axis=1))
    return wall


def speed_rows(variants: list[Variant], batch_size: int, num_videos: int) -> list[dict]:
    base = variants[0]
    rows = []
    for v in variants:
        rows.append({
            "setting": v.label, "tau": v.tau, "batch_size": batch_size,
            "wall_seconds_per_video": sum(v.walls) / num_videos,
            "diffusion_seconds_per_video": v.diffusion / num_videos,
            "routing_seconds_per_video": v.routing / num_videos,
            "decode_seconds_per_video": v.decode / num_videos,
            "speedup": statistics.median(b / t for b, t in zip(base.walls, v.walls)),
            "speedup_total": sum(base.walls) / sum(v.walls),
            "speedup_diffusion": base.diffusion / v.diffusion,
            "acceptance_rate": v.accepted / v.drafted if v.drafted else None,
            "drafted_blocks": v.drafted,
            "accepted_blocks": v.accepted,
            "target_denoised_blocks": v.target_blocks,
            "target_block_share": v.target_blocks / v.blocks,
            "mean_worst_frame_score": float(statistics.fmean(v.scores)) if v.scores else None,
            "per_round_wall_seconds": v.walls,
        })
    return rows


def quality_rows(variants: list[Variant], captions: list[str], real_frames, workers: int) -> list[dict]:
    import numpy as np

    from vgen.eval.video_eval import score_in_parallel
    from vgen.eval.video_metrics import frame_fid

    base_videos = np.concatenate(variants[0].videos)
    rows = []
    for v in variants:
        videos = np.concatenate(v.videos)  # (N, F, H, W, 3) uint8
        row = {"setting": v.label, "tau": v.tau, **score_in_parallel(list(zip(videos, captions)), workers),
               "shapes_fid": frame_fid(videos.reshape(-1, *videos.shape[2:]), real_frames),
               "pixel_mae_vs_target_only": float(np.abs(videos.astype(np.int16) - base_videos).mean()),
               "equal_to_target_only": bool(np.array_equal(videos, base_videos))}
        rows.append(row)
    base = rows[0]
    for row in rows:
        ratio = row["caption_adherence"] / base["caption_adherence"] if base["caption_adherence"] else None
        row["caption_adherence_vs_target_only"] = ratio
        row["shapes_fid_delta_vs_target_only"] = row["shapes_fid"] - base["shapes_fid"]
    return rows


def load_drafter(args, pipe, device):
    """The drafter pipeline of ``--drafter`` (checked against ``pipe``) or None, and the draft steps."""
    from vgen.errors import UserError
    from vgen.pipelines.video import load_video_pipeline

    if args.drafter is not None and args.draft_steps is not None:
        raise UserError("give the drafter as --drafter DIR or as --draft-steps N (this model in fewer steps), not "
                        "both")
    if args.drafter is None:
        steps = 1 if args.draft_steps is None else args.draft_steps
        return None, pipe.option("num_steps").check(steps)
    try:
        drafter, _ = load_video_pipeline(args.drafter, device)
    except UserError as err:
        raise UserError(f"--drafter: {err}") from None
    if tuple(drafter.transformer.block_shape) != tuple(pipe.transformer.block_shape):
        raise UserError(f"--drafter {args.drafter} makes blocks {tuple(drafter.transformer.block_shape)}, the model "
                        f"{tuple(pipe.transformer.block_shape)}; SDVG needs one latent space and block size")
    return drafter, None


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vgen.errors import UserError
    from vgen.eval.video_metrics import frame_fid, real_videos
    from vgen.eval.video_scorers import load_frame_scorer
    from vgen.pipelines.video import load_video_pipeline

    if args.tau is None:
        raise UserError("--sdvg needs --tau, the thresholds to sweep, e.g. --tau=-inf,0.3,inf")
    taus = parse_taus(args.tau)
    batch_size = min(args.videos, 4) if args.batch_size is None else args.batch_size
    workers = 1 if args.workers is None else args.workers
    if args.videos < 1 or batch_size < 1 or workers < 1:
        raise UserError("--videos, --batch-size and --workers must be >= 1")
    pipe, model_dir = load_video_pipeline(args.model, args.device)
    if not pipe.is_text_conditional:
        raise UserError(f"{model_dir} is not text-conditional; SDVG scores frames against Moving Shapes captions")
    frames = pipe.check_num_frames(args.frames)
    drafter_pipe, draft_steps = load_drafter(args, pipe, args.device)
    # the drafter runs on the target's cache mode, alone as under the router
    sampling = {"cache": pipe.resolve_sampling(cache=args.cache)["cache"]}
    if sampling["cache"] == "forcing_kv":
        for name, p in (("the model", pipe), ("the drafter", drafter_pipe)):
            if p is not None and p.head_profile is None:
                raise UserError(f"{name} has no head_profile.json, which the forcing_kv cache needs: run 'vgen "
                                "profile-heads' on it or choose another --cache")
    setup = Setup(pipe, drafter_pipe, draft_steps, load_frame_scorer(args.scorer), sampling)
    world_seed = 1 if args.world_seed is None else args.world_seed
    resolution = pipe.autoencoder.downsample * pipe.transformer.config.latent_height
    real = real_videos(args.videos, frames, resolution, seed=world_seed)
    captions = [caption for _, caption in real]
    variants = [Variant("target-only"), Variant("draft-only")] + [Variant(tau_label(t), t) for t in taus]
    load_start = os.getloadavg()
    warm_frames = min(frames, 2 * pipe.frames_per_block)  # two blocks: the first (target) and a routed one
    for variant in variants:  # warm-up: kernels, allocations, the detector; checks every setting before timing
        warm = captions[:batch_size]
        generate(setup, variant, warm, [args.seed + i for i in range(len(warm))], warm_frames, record=False)
    for start in range(0, args.videos, batch_size):
        chunk = captions[start:start + batch_size]
        seeds = [args.seed + start + i for i in range(len(chunk))]
        for variant in variants:
            generate(setup, variant, chunk, seeds, frames)
    load_end = os.getloadavg()
    real_frames = np.concatenate([v for v, _ in real])
    other = np.concatenate([v for v, _ in real_videos(args.videos, frames, resolution, seed=world_seed + 1000)])
    device = pipe._execution_device()
    report = {
        "benchmark": "video-sdvg",
        "method": "sdvg",
        "model": str(model_dir),
        "drafter": args.drafter,
        "draft_steps": draft_steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "videos": args.videos,
        "batch_size": batch_size,
        "rounds": len(variants[0].walls),
        "frames": frames,
        "frames_per_block": pipe.frames_per_block,
        "blocks_per_video": frames // pipe.frames_per_block,
        "seed": args.seed,
        "world_seed": world_seed,
        "scorer": args.scorer or "moving_shapes",
        "taus": taus,
        "sampling": pipe.resolve_sampling(**sampling),
        "draft_sampling": (drafter_pipe.resolve_sampling(**sampling) if drafter_pipe is not None
                           else pipe.resolve_sampling(**sampling, num_steps=draft_steps)),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "speed": speed_rows(variants, batch_size, args.videos),
        "quality": quality_rows(variants, captions, real_frames, workers),
        "real_fid_floor": frame_fid(other, real_frames),
    }
    if args.plot:
        from vgen.eval.speed_quality_plot import plot_speed_quality

        report["plot"] = str(plot_speed_quality(report, args.plot, PLOT_METRICS))
    text = json.dumps(json_safe(report), indent=2, allow_nan=False)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0
