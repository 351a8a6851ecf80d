"""Per-frame scorers for SDVG quality routing (:mod:`vgen.samplers.sdvg`).

A scorer is any callable ``scorer(frames_BfHW3 uint8, prompts) -> scores (B, f)`` (higher is better).
:class:`MovingShapesFrameScorer` is the one for the Moving Shapes world: each frame's caption adherence as a number,
read by the exact Shapes detector (:mod:`vgen.eval.shapes_detector`, no learned weights):

    score(frame) = min over the caption's objects of the confidence of the best detection of that shape in that
                   colour (0 when there is none)

so a frame scores >= 0.3 (GenEval's detection threshold, :data:`vgen.eval.video_metrics.MIN_SCORE`) exactly when it
is caption-adherent in :mod:`vgen.eval.video_metrics`' sense, and the worst-frame score of a block is >= tau when
every frame shows every captioned object at least that confidently. Directions are not scored per frame (motion
needs several frames; the router's unit is the block).

``MovingShapesFrameScorer(shapes=False)`` (``--scorer moving_shapes_colours``) asks less: the best clean blob of each
captioned colour, whatever its outline (the detector without its shape fitting, so also several times cheaper). It
suits models that get colours, counts and positions right before outlines, as small video models do.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from vgen.data.moving_shapes import parse_motion_caption


class MovingShapesFrameScorer:
    """Caption adherence of every frame (see the module doc); ``detector``: default the exact Shapes detector (any
    other needs its ``detect(image, colors=..., fit_shapes=...)``: only the caption's colours are looked for).
    ``shapes=False``: colours only (a blob of the captioned colour counts whatever its outline)."""

    def __init__(self, detector=None, shapes: bool = True):
        if detector is None:
            from vgen.eval.shapes_detector import ShapesDetector

            detector = ShapesDetector()
        self.detector, self.shapes = detector, shapes

    @staticmethod
    @lru_cache(maxsize=256)
    def _objects(prompt: str) -> tuple[tuple[str, str | None], ...]:
        return tuple((shape, color) for shape, color, _ in parse_motion_caption(prompt))

    def frame_score(self, frame_HW3: np.ndarray, prompt: str) -> float:
        """One frame's score in [0, 1]."""
        objects = self._objects(prompt)
        colors = None if any(color is None for _, color in objects) else {color for _, color in objects}
        detections = self.detector.detect(Image.fromarray(frame_HW3), colors=colors, fit_shapes=self.shapes)
        best = []
        for shape, color in objects:
            hits = [d.score for d in detections
                    if (d.label == shape or not self.shapes) and (color is None or d.color == color)]
            best.append(max(hits, default=0.0))
        return float(min(best))

    def __call__(self, frames_BfHW3: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        frames_BfHW3 = np.asarray(frames_BfHW3)
        if frames_BfHW3.ndim != 5 or frames_BfHW3.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames (B, f, H, W, 3), got {frames_BfHW3.dtype} {frames_BfHW3.shape}")
        if len(prompts) != frames_BfHW3.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {frames_BfHW3.shape[0]} videos")
        return np.array([[self.frame_score(frame, prompt) for frame in video]
                         for video, prompt in zip(frames_BfHW3, prompts)], dtype=np.float64)


def load_frame_scorer(spec: str | None):
    """``None`` or ``"moving_shapes"``: :class:`MovingShapesFrameScorer`; ``"moving_shapes_colours"``: the same on
    colours only; ``"module:factory"``: the callable the factory returns (called with no arguments), e.g. a reward
    model."""
    if spec in (None, "moving_shapes"):
        return MovingShapesFrameScorer()
    if spec == "moving_shapes_colours":
        return MovingShapesFrameScorer(shapes=False)
    from vgen.errors import UserError
    from vgen.eval.geneval import load_plugin

    scorer = load_plugin(spec, what="SDVG scorer")
    if not callable(scorer):
        raise UserError(f"the SDVG scorer factory {spec!r} must return a callable scorer(frames, prompts)")
    return scorer
