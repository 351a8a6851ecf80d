"""Video quality on Moving Shapes, scored frame by frame with the exact Shapes detector.

Every frame of a video goes through :class:`vgen.eval.shapes_detector.ShapesDetector` (detections with score >=
``min_score``, GenEval's 0.3); the caption (:func:`vgen.data.moving_shapes.parse_motion_caption`) says which
objects should be there and where they go. Per video:

* **caption adherence**: the share of frames in which every captioned object (its shape in its colour) is detected;
  ``caption_adherence_all_frames`` is the share of videos adherent in every frame;
* **identity persistence**: the share of consecutive frame pairs that show the same objects (the same multiset of
  (shape, colour) detections) with every object moved by at most ``max_step`` pixels (the world's fastest object
  moves ``0.06 x resolution`` per frame): no object appears, vanishes, changes shape or colour, or jumps;
* **motion adherence**: for every captioned object with a direction, whether its detected centre moved that way over
  the first :data:`~vgen.data.moving_shapes.DIRECTION_FRAMES` frames (the along-direction displacement is positive
  and larger than the sideways one; the world starts objects so that they cannot bounce before then). An object
  that is not detected at both ends counts as a miss.

Over a set of videos, :func:`score_videos` averages these and :func:`frame_fid` adds the **per-frame Shapes-FID**:
FID between the Shapes-feature statistics of all generated frames and of real frames (Moving Shapes renders of the
same length, resolution and captions' distribution). Real videos score 1.0 on the three detector metrics
(``tests/test_video_metrics.py``), which is the ceiling.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from vgen.data.moving_shapes import DIRECTION_FRAMES, DIRECTIONS, SPEED_RANGE, parse_motion_caption

MIN_SCORE = 0.3  # GenEval's detection threshold


@dataclass
class VideoScore:
    """One video's scores (see the module doc); ``motion_adherence`` is None when the caption names no direction."""

    caption_adherence: float
    caption_adherence_all_frames: bool
    identity_persistence: float
    motion_adherence: float | None
    frames: int


def detect_frames(frames_THW3: np.ndarray, detector=None, min_score: float = MIN_SCORE) -> list[list]:
    """Confident detections of every frame of ``frames_THW3`` (uint8)."""
    if detector is None:
        from vgen.eval.shapes_detector import ShapesDetector

        detector = ShapesDetector()
    return [[d for d in detector.detect(Image.fromarray(frame)) if d.score >= min_score] for frame in frames_THW3]


def _centre(detection) -> np.ndarray:
    x0, y0, x1, y1 = detection.box
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2])


def _find(detections, shape: str, color: str | None):
    """The most confident detection of ``shape`` in ``color`` (any colour when None), or None."""
    hits = [d for d in detections if d.label == shape and (color is None or d.color == color)]
    return max(hits, key=lambda d: d.score) if hits else None


def score_video(detections: Sequence[Sequence], caption: str, resolution: int) -> VideoScore:
    """Scores of one video from its per-frame detections (:func:`detect_frames`) and its caption."""
    objects = parse_motion_caption(caption)
    T = len(detections)
    present = [all(_find(frame, shape, color) is not None for shape, color, _ in objects) for frame in detections]
    max_step = SPEED_RANGE[1] * resolution + 2.0
    same = []
    for a, b in zip(detections[:-1], detections[1:]):
        kinds_a = Counter((d.label, d.color) for d in a)
        if kinds_a != Counter((d.label, d.color) for d in b):
            same.append(False)
            continue
        moved_ok = True
        for label, color in kinds_a:  # each object's nearest same-kind detection in the next frame
            for d in (d for d in a if (d.label, d.color) == (label, color)):
                nearest = min(np.linalg.norm(_centre(d) - _centre(e)) for e in b if (e.label, e.color) == (label, color))
                moved_ok &= nearest <= max_step
        same.append(moved_ok)
    motion = []
    window = min(DIRECTION_FRAMES, T - 1)
    for shape, color, direction in objects:
        if direction is None or window < 1:
            continue
        start, end = _find(detections[0], shape, color), _find(detections[window], shape, color)
        if start is None or end is None:
            motion.append(False)
            continue
        shift = _centre(end) - _centre(start)
        along = float(shift @ np.array(DIRECTIONS[direction], dtype=float))
        sideways = abs(float(shift @ np.array(DIRECTIONS[direction][::-1], dtype=float)))
        motion.append(along > 0 and along > sideways)
    return VideoScore(
        caption_adherence=float(np.mean(present)) if T else 0.0,
        caption_adherence_all_frames=bool(T and all(present)),
        identity_persistence=float(np.mean(same)) if same else 1.0,
        motion_adherence=float(np.mean(motion)) if motion else None,
        frames=T,
    )


def score_videos(videos: Iterable[tuple[np.ndarray, str]], detector=None, min_score: float = MIN_SCORE) -> dict:
    """Mean scores over ``(frames_THW3 uint8, caption)`` pairs: ``videos``, ``frames``, ``caption_adherence``,
    ``caption_adherence_all_frames``, ``identity_persistence``, ``motion_adherence`` (over videos whose caption
    has directions) and ``per_video`` (a list of :class:`VideoScore` dicts)."""
    if detector is None:
        from vgen.eval.shapes_detector import ShapesDetector

        detector = ShapesDetector()
    scores = []
    for frames, caption in videos:
        scores.append(score_video(detect_frames(frames, detector, min_score), caption, frames.shape[1]))
    if not scores:
        raise ValueError("no videos to score")
    motions = [s.motion_adherence for s in scores if s.motion_adherence is not None]
    return {
        "videos": len(scores),
        "frames": sum(s.frames for s in scores),
        "caption_adherence": float(np.mean([s.caption_adherence for s in scores])),
        "caption_adherence_all_frames": float(np.mean([s.caption_adherence_all_frames for s in scores])),
        "identity_persistence": float(np.mean([s.identity_persistence for s in scores])),
        "motion_adherence": float(np.mean(motions)) if motions else None,
        "per_video": [asdict(s) for s in scores],
    }


def frame_features(frames_NHW3: np.ndarray, device=None, batch_size: int = 256) -> np.ndarray:
    """Shapes-feature vectors (N, F) of frames (uint8, resized to the feature network's resolution)."""
    from vgen.eval.features import array_features, build_extractor

    extractor = build_extractor("shapes", "clean", device)
    return array_features(extractor, np.ascontiguousarray(frames_NHW3), batch_size, verbose=False)


def frame_fid(frames_NHW3: np.ndarray, real_frames_NHW3: np.ndarray, device=None) -> float:
    """Per-frame Shapes-FID of generated frames against real frames (both uint8 (N, H, W, 3))."""
    from vgen.eval.fid import frechet_distance, mean_cov

    mu1, sigma1 = mean_cov(frame_features(frames_NHW3, device))
    mu2, sigma2 = mean_cov(frame_features(real_frames_NHW3, device))
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def real_videos(count: int, num_frames: int, resolution: int, seed: int = 1, motion: str = "directions",
                max_objects: int = 2) -> list[tuple[np.ndarray, str]]:
    """``count`` Moving Shapes renders ``(frames (T, H, W, 3) uint8, caption)``: the reference for FID and the
    ceiling of the detector metrics."""
    from vgen.data.moving_shapes import MovingShapesWorld

    world = MovingShapesWorld(resolution, num_frames, seed, motion=motion, max_objects=max_objects)
    return [(sample.frames, sample.caption) for sample in (world.sample(i) for i in range(count))]
