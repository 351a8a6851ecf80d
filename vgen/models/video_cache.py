"""Which KV cache a block-causal video generator runs on, chosen by config: full, sink + rolling window, Forcing-KV.

All three are the one cache protocol of :mod:`vgen.kv_cache`; this module only sizes them in frames of a video
model and attaches the keep policy of the compressed one:

=============== ===================================== ==========================================================
``mode``        cache                                  what every head of every layer attends to (besides the block)
=============== ===================================== ==========================================================
``full``        :class:`~vgen.kv_cache.FullKVCache`    every generated frame (capacity: the rollout length)
``sink_window`` :class:`~vgen.kv_cache.SinkWindowKVCache` the first ``sink_frames`` frames + the last
                                                       ``window_frames`` frames (a ring; memory fixed)
``forcing_kv``  :class:`~vgen.kv_cache.CompressedKVCache` static heads: sink + ``recent_frames``; dynamic heads also
                + :class:`~vgen.models.forcing_kv.ForcingKVPolicy`  ``dynamic_segments`` most-changed segments of the
                                                       frames that just left the recent window (memory fixed)
=============== ===================================== ==========================================================

Static and dynamic heads come from an offline head profile (:class:`~vgen.models.forcing_kv.HeadProfile`, the
``head_profile.json`` that ``vgen profile-heads`` writes beside a model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vgen.errors import UserError
from vgen.kv_cache import CompressedKVCache, FullKVCache, KVCache, SinkWindowKVCache

CACHE_MODES = ("full", "sink_window", "forcing_kv")


@dataclass(frozen=True)
class VideoCacheConfig:
    """How a video generator caches the past (see the module table). Frame counts are latent frames.

    Attributes:
        mode: ``full``, ``sink_window`` or ``forcing_kv``.
        sink_frames: the first frames every head keeps forever (sink_window, forcing_kv).
        window_frames: the most recent frames the ring keeps (sink_window).
        recent_frames: the most recent frames every head keeps whole (forcing_kv; at least 1).
        segments_per_frame: a frame's tokens are cut into this many contiguous bands (raster rows) for scoring.
        dynamic_segments: bands of most-changed regions a dynamic head keeps (None: one frame's worth,
            ``segments_per_frame``).
        head_profile: a :class:`~vgen.models.forcing_kv.HeadProfile` or the path of its JSON (forcing_kv).
        backend: the full cache's attention (``sdpa`` or ``kernels``); the segment caches always use the kernels
            (``auto``: Triton on CUDA, the PyTorch reference on CPU).
    """

    mode: str = "full"
    sink_frames: int = 1
    window_frames: int = 7
    recent_frames: int = 1
    segments_per_frame: int = 4
    dynamic_segments: int | None = None
    head_profile: Any = None
    backend: str = "sdpa"

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise UserError(f"unknown video cache mode {self.mode!r}; choose one of {', '.join(CACHE_MODES)}")
        for name in ("sink_frames", "window_frames", "recent_frames", "segments_per_frame"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise UserError(f"cache {name} must be a whole number >= 0, got {getattr(self, name)!r}")
        if self.mode == "sink_window" and self.window_frames < 1:
            raise UserError("a sink + rolling window cache needs window_frames >= 1")
        if self.mode == "forcing_kv" and (self.recent_frames < 1 or self.segments_per_frame < 1):
            raise UserError("the Forcing-KV cache needs recent_frames >= 1 and segments_per_frame >= 1")
        if self.dynamic_segments is not None and self.dynamic_segments < 0:
            raise UserError(f"dynamic_segments must be >= 0, got {self.dynamic_segments}")

    def with_profile(self, profile: Any) -> VideoCacheConfig:
        return replace(self, head_profile=profile)

    @property
    def num_dynamic_segments(self) -> int:
        return self.segments_per_frame if self.dynamic_segments is None else self.dynamic_segments

    def history_frames(self, frames_per_block: int, max_frames: int) -> float:
        """Frames of history the longest head holds between blocks (upper bound; Forcing-KV: dynamic heads)."""
        if self.mode == "full":
            return max_frames - frames_per_block
        if self.mode == "sink_window":
            return self.sink_frames + self.window_frames
        return self.sink_frames + self.recent_frames + self.num_dynamic_segments / self.segments_per_frame


def build_video_cache(spec: VideoCacheConfig, model, *, batch: int, max_frames: int, dtype: torch.dtype,
                      device: torch.device | str) -> tuple[KVCache, Any]:
    """The cache ``spec`` describes for ``model`` (a :class:`~vgen.models.video_ar.BlockCausalVideoTransformer`) and
    ``batch`` rows, plus its keep policy (None except for ``forcing_kv``). ``max_frames`` bounds the full cache."""
    T, f = model.tokens_per_frame, model.frames_per_block
    sizes = dict(num_layers=len(model.blocks), batch=batch, heads=model.num_heads, head_dim=model.head_dim,
                 dtype=dtype, device=device)
    if max_frames % f:
        raise UserError(f"the video length ({max_frames} frames) must be a multiple of the block size ({f} frames)")
    if spec.mode == "full":
        return FullKVCache(capacity=max_frames * T, backend=spec.backend, **sizes), None
    backend = "auto"
    if spec.mode == "sink_window":
        cache = SinkWindowKVCache(sink_tokens=spec.sink_frames * T, window_tokens=spec.window_frames * T,
                                  chunk_capacity=f * T, backend=backend, **sizes)
        return cache, None
    from vgen.models.forcing_kv import ForcingKVPolicy, load_head_profile

    profile = spec.head_profile
    if profile is None:
        raise UserError("the Forcing-KV cache needs a head profile: run 'vgen profile-heads --model DIR' (it writes "
                        "DIR/head_profile.json) or pass one")
    if isinstance(profile, (str, Path)):
        profile = load_head_profile(profile)
    policy = ForcingKVPolicy(profile, spec, model)
    capacity = policy.max_history_tokens() + f * T
    return CompressedKVCache(capacity=capacity, chunk_capacity=f * T, backend=backend, **sizes), policy

