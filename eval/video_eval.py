"""Evaluate a video model on Moving Shapes for every cache mode and rollout length (``vgen eval video``).

For each rollout length (multiples of the model's training length) the same ``videos`` captions are drawn from the
Moving Shapes world (``world_seed``, directions captions, at most two objects: the training distribution, other
videos than the training set's), and for each cache mode the model generates one video per caption (video i with
seed ``seed + i``) with its saved sampling settings. Scores (:mod:`vgen.eval.video_metrics`): caption adherence,
identity persistence and motion adherence from the exact detector on every frame, and per-frame Shapes-FID against
the frames of real renders of the same captions' videos and length. The same metrics of real renders (and the FID of
a second, disjoint set of real renders) are the ceiling, reported as mode ``real``.

The Forcing-KV cache chooses one set of dynamic segments for all videos of a batch; ``batch_size`` is therefore part
of the setting (it is recorded).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vgen.eval.video_metrics import frame_fid, real_videos, score_video


def _detect_and_score(item: tuple[np.ndarray, str]) -> dict:
    """Worker: detector scores of one video (a process of its own: the detector is NumPy and single-threaded)."""
    from dataclasses import asdict

    from vgen.eval.video_metrics import detect_frames

    frames, caption = item
    return asdict(score_video(detect_frames(frames), caption, frames.shape[1]))


def score_in_parallel(videos: list[tuple[np.ndarray, str]], workers: int) -> dict:
    """:func:`vgen.eval.video_metrics.score_videos`'s means, the detector run in ``workers`` processes."""
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_video = list(pool.map(_detect_and_score, videos, chunksize=4))
    else:
        per_video = [_detect_and_score(item) for item in videos]
    motions = [s["motion_adherence"] for s in per_video if s["motion_adherence"] is not None]
    return {
        "videos": len(per_video),
        "frames": sum(s["frames"] for s in per_video),
        "caption_adherence": float(np.mean([s["caption_adherence"] for s in per_video])),
        "caption_adherence_all_frames": float(np.mean([s["caption_adherence_all_frames"] for s in per_video])),
        "identity_persistence": float(np.mean([s["identity_persistence"] for s in per_video])),
        "motion_adherence": float(np.mean(motions)) if motions else None,
    }


def generate_videos(pipe, captions: list[str], num_frames: int, mode: str, seed: int, batch_size: int,
                    **sampling) -> np.ndarray:
    """uint8 videos (N, F, H, W, 3), video i from seed ``seed + i``."""
    import torch

    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        frames = pipe(chunk, num_frames=num_frames, generator=generators, cache=mode, output_type="pt",
                      **sampling).frames  # (B, F, 3, H, W) in [0, 1]
        out.append((frames.permute(0, 1, 3, 4, 2) * 255).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def evaluate_video_model(pipe, videos: int = 200, lengths: tuple[int, ...] = (1, 2, 4),
                         modes: tuple[str, ...] = ("full", "sink_window", "forcing_kv"), seed: int = 0,
                         world_seed: int = 1, batch_size: int = 25, workers: int = 2, out_dir: str | Path | None = None,
                         log=print, **sampling) -> dict:
    """The table of the module doc as a dict: ``{"settings": ..., "results": [row, ...]}``, one row per (mode,
    length); ``out_dir`` also gets ``video_eval.json`` and a frame strip of the first 4 videos of every row."""
    from vgen.video_io import save_video

    base = pipe.transformer.config.max_frames
    H = pipe.autoencoder.downsample * pipe.transformer.config.latent_height
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in lengths:
        frames = base * length
        real = real_videos(videos, frames, H, seed=world_seed)
        captions = [caption for _, caption in real]
        real_frames = np.concatenate([v for v, _ in real])
        start = time.perf_counter()
        other = np.concatenate([v for v, _ in real_videos(videos, frames, H, seed=world_seed + 1000)])
        rows.append({"mode": "real", "length_multiple": length, "frames_per_video": frames,
                     **score_in_parallel(real, workers), "shapes_fid": frame_fid(other, real_frames),
                     "seconds": time.perf_counter() - start})
        log(json.dumps(rows[-1]))
        for mode in modes:
            start = time.perf_counter()
            generated = generate_videos(pipe, captions, frames, mode, seed, batch_size, **sampling)
            gen_seconds = time.perf_counter() - start
            pairs = list(zip(generated, captions))
            row = {"mode": mode, "length_multiple": length, "frames_per_video": frames,
                   **score_in_parallel(pairs, workers), "shapes_fid": frame_fid(generated.reshape(-1, H, H, 3),
                                                                                 real_frames),
                   "generation_seconds": gen_seconds, "seconds": time.perf_counter() - start}
            rows.append(row)
            log(json.dumps(row))
            if out_dir is not None:
                save_video(list(generated[:4]), out_dir / f"{mode}_x{length}.png", scale=2, captions=captions[:4])
    folder = getattr(pipe, "name_or_path", None)  # the folder it was loaded from (None for a pipeline in memory)
    model = str(Path(folder).resolve()) if folder and Path(folder).is_dir() else None
    report = {"settings": {"model": model, "videos": videos, "lengths": list(lengths), "modes": list(modes),
                           "seed": seed, "world_seed": world_seed, "batch_size": batch_size,
                           "sampling": pipe.resolve_sampling(**sampling), "training_frames": base},
              "results": rows}
    if out_dir is not None:
        (out_dir / "video_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
