"""Forcing-KV for block-causal video models: offline head profiles and the keep policy of the compressed cache.

**Head profile.** Forcing-KV observes that a head's attention pattern is stable across samples and denoising
steps: *static* heads put almost all their non-sink attention on the newest frames (chunk transitions, detail),
*dynamic* heads also look further back (motion, consistency). The profile measures, per (layer, head), the
attention mass the current block's queries put on the last ``recent_frames`` key frames over the mass on all key
frames after the first ``skip_frames`` (the sink), on clips of the training length whose context is clean and whose
last block is noised to each profiling time; a head is static when this share is ``>= threshold`` (Forcing-KV: the
last 4 of 3-frame chunks, sink of 3 frames skipped, 0.8). The result is a JSON file beside the model,
``{"layers": [{"layer_idx", "static_head", "dynamic_head", "scores"}], ...}`` (Forcing-KV's layout plus the scores
and the model's fingerprint, so a profile of another model is refused).

**Keep policy** (:class:`ForcingKVPolicy`, run after every committed block). With the block just appended, each
head of a layer keeps

* static heads: the ``sink_frames`` first frames and the ``recent_frames`` newest frames;
* dynamic heads: the same plus the ``dynamic_segments`` most-changed segments (bands of ``T / segments_per_frame``
  tokens) of the frames that just left the recent window. "Most changed" is the lowest cosine similarity of the
  dynamic heads' keys between a frame and the next one in time (kernel 3, :func:`vgen.kernels.segment_scores`),
  averaged over the batch and scored in every layer on that layer's dynamic heads (Forcing-KV scores one layer and
  reuses its choice); the previous block's dynamic segments are replaced, not accumulated (as in Forcing-KV), so
  memory stays fixed however long the video.

The kept rows are gathered in place by :meth:`vgen.kv_cache.CompressedKVCache.compact` (kernel 2). Keys were cached
after RoPE at their absolute frame positions, so nothing is re-rotated. The cache keeps one history for all rows of
a batch, so with several videos in a batch the dynamic choice is shared (a video then depends on its batch mates).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import reduce

from vgen.errors import UserError
from vgen.kernels import segment_scores

PROFILE_FILE = "head_profile.json"
PROFILE_FORMAT = "vgen-forcing-kv-head-profile-v1"


# ----------------------------------------------------------------------------------------------------------------
# Model fingerprint
# ----------------------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's weights rounded to fp16, by parameter name: equal for an fp32 model and
    its fp16 export, different for any other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        value = tensor.detach().cpu()
        value = value.to(torch.float16) if value.is_floating_point() else value
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Head profile
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HeadProfile:
    """Per layer, the static and dynamic heads (every head exactly once) and each head's score.

    ``scores[l][h]`` = attention mass on the last ``recent_frames`` key frames / mass on key frames ``>=
    skip_frames``; static iff ``>= threshold``. ``fingerprint`` identifies the model (:func:`model_fingerprint`).
    """

    scores: list[list[float]]
    threshold: float = 0.8
    recent_frames: int = 5
    skip_frames: int = 1
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_heads(self) -> int:
        return len(self.scores[0]) if self.scores else 0

    def static_heads(self, layer: int) -> list[int]:
        return [h for h, s in enumerate(self.scores[layer]) if s >= self.threshold]

    def dynamic_heads(self, layer: int) -> list[int]:
        return [h for h, s in enumerate(self.scores[layer]) if s < self.threshold]

    def static_mask(self) -> torch.Tensor:
        """(num_layers, num_heads) bool, True for static heads."""
        return torch.tensor(self.scores) >= self.threshold

    @property
    def counts(self) -> tuple[int, int]:
        """(static, dynamic) heads over all layers."""
        static = int(self.static_mask().sum())
        return static, self.num_layers * self.num_heads - static

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "description": (f"static if attention mass on the last {self.recent_frames} key frames / mass on key "
                            f"frames [{self.skip_frames}:] >= {self.threshold}"),
            "threshold": self.threshold,
            "recent_frames": self.recent_frames,
            "skip_frames": self.skip_frames,
            "model_fingerprint": self.fingerprint,
            "settings": self.settings,
            "num_static": self.counts[0],
            "num_dynamic": self.counts[1],
            "layers": [
                {"layer_idx": layer, "static_head": self.static_heads(layer), "dynamic_head": self.dynamic_heads(layer),
                 "scores": [round(float(s), 6) for s in self.scores[layer]]}
                for layer in range(self.num_layers)
            ],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def check_model(self, model, where: str = "the head profile") -> None:
        """A :class:`UserError` unless this profile was made for ``model`` (same layers, heads and weights)."""
        depth, heads = len(model.blocks), model.num_heads
        if (self.num_layers, self.num_heads) != (depth, heads):
            raise UserError(f"{where} covers {self.num_layers} layers x {self.num_heads} heads, but this model has "
                            f"{depth} x {heads}: it belongs to another model; run 'vgen profile-heads --model DIR'")
        mine = model_fingerprint(model)
        if self.fingerprint and self.fingerprint != mine:
            raise UserError(f"{where} was made for another model (fingerprint {self.fingerprint}, this model "
                            f"{mine}); run 'vgen profile-heads --model DIR' for this one")


def load_head_profile(path: str | Path) -> HeadProfile:
    """Read a profile JSON (a file, or a model folder holding ``head_profile.json``); one-line errors."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILE
    if not path.is_file():
        raise UserError(f"head profile not found: {path}; make one with 'vgen profile-heads --model DIR'")
    try:
        data = json.loads(path.read_text())
        layers = sorted(data["layers"], key=lambda entry: entry["layer_idx"])
        scores = [[float(s) for s in entry["scores"]] for entry in layers]
        profile = HeadProfile(scores, float(data["threshold"]), int(data["recent_frames"]), int(data["skip_frames"]),
                              str(data.get("model_fingerprint", "")), dict(data.get("settings", {})))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a head profile written by 'vgen profile-heads' ({err!r})") from None
    if not scores or len({len(s) for s in scores}) != 1:
        raise UserError(f"{path} is not a head profile: it needs the same number of head scores in every layer")
    for entry in layers:
        if sorted(entry["static_head"] + entry["dynamic_head"]) != list(range(profile.num_heads)):
            raise UserError(f"{path}: layer {entry['layer_idx']} must list every head once as static or dynamic")
    return profile


class _FrameMass:
    """Accumulates, per (layer, head), the attention mass of the last block's queries on every key frame."""

    def __init__(self, num_layers: int, num_heads: int, num_frames: int, tokens_per_frame: int, query_tokens: int):
        self.mass = torch.zeros(num_layers, num_heads, num_frames, dtype=torch.float64)
        self.T, self.query_tokens = tokens_per_frame, query_tokens

    def __call__(self, layer: int, probs_BHLL: torch.Tensor) -> None:
        rows = probs_BHLL[:, :, -self.query_tokens:]  # (B, H, q, L): the last block's queries
        per_frame = reduce(rows.double(), "B H q (F T) -> H F", "sum", T=self.T)
        self.mass[layer] += per_frame.cpu()


@torch.no_grad()
def profile_heads(model, latents_BFChw: torch.Tensor, cond, *, times: tuple[float, ...] = (0.9, 0.6, 0.3),
                  recent_frames: int | None = None, skip_frames: int = 1, threshold: float = 0.8,
                  generator: torch.Generator | None = None, batch_size: int = 8) -> HeadProfile:
    """Profile every head of ``model`` on clean clips ``latents_BFChw`` (B, F, C, h, w) with conditions ``cond``.

    For each clip and each time t in ``times`` the last block is noised to t (noise from ``generator``) while the
    context stays clean (t = 0, as the cache holds it), and one teacher-forced pass records the attention of the
    last block's queries (the same attention cached generation computes). ``recent_frames`` defaults to the block
    plus the frame before it (Forcing-KV's 4 for 3-frame blocks). Deterministic for a fixed model, clips and
    generator.
    """
    model.check_latents(latents_BFChw, "profiling clips")
    B, F_ = latents_BFChw.shape[:2]
    f, T = model.frames_per_block, model.tokens_per_frame
    recent_frames = f + 1 if recent_frames is None else recent_frames
    if F_ % f or F_ < recent_frames + skip_frames + 1:
        raise UserError(f"profiling clips need a whole number of {f}-frame blocks and more than {recent_frames} + "
                        f"{skip_frames} frames, got {F_}")
    mass = _FrameMass(len(model.blocks), model.num_heads, F_, T, f * T)
    device = model.device
    was_training = model.training
    model.eval()
    try:
        with model.probe_attention(mass):
            for start in range(0, B, batch_size):
                x0 = latents_BFChw[start:start + batch_size].to(device=device, dtype=torch.float32)
                rows = cond.rows(start, start + x0.shape[0])
                for t in times:
                    eps = torch.randn(x0[:, -f:].shape, generator=generator, dtype=torch.float32).to(device)
                    x = x0.clone()
                    x[:, -f:] = (1 - t) * x0[:, -f:] + t * eps
                    t_BF = torch.zeros(x.shape[:2], device=device)
                    t_BF[:, -f:] = t
                    model(x, t_BF, rows, drop_condition=False)
    finally:
        model.train(was_training)
    recent = mass.mass[:, :, F_ - recent_frames:].sum(-1)
    beyond_sink = mass.mass[:, :, skip_frames:].sum(-1).clamp_min(1e-30)
    scores = (recent / beyond_sink).tolist()
    settings = {"clips": B, "frames": F_, "times": list(times)}
    return HeadProfile(scores, threshold, recent_frames, skip_frames, model_fingerprint(model), settings)


# ----------------------------------------------------------------------------------------------------------------
# Keep policy
# ----------------------------------------------------------------------------------------------------------------

# A piece of a head's history: (frame, first token inside the frame, tokens), in storage (= time) order.
Piece = tuple[int, int, int]


class ForcingKVPolicy:
    """Chooses what every head of the compressed cache keeps after each block (see the module doc).

    Static and dynamic heads of a layer each share one history layout (a list of :data:`Piece`), tracked here, so
    keep lists are positions in a head's own history and :meth:`vgen.kv_cache.CompressedKVCache.compact` gathers
    them with one kernel launch per layer.
    """

    def __init__(self, profile: HeadProfile, spec, model):
        profile.check_model(model)
        self.profile, self.spec = profile, spec
        self.T = model.tokens_per_frame
        self.f = model.frames_per_block
        if spec.segments_per_frame > self.T:
            raise UserError(f"segments_per_frame ({spec.segments_per_frame}) exceeds the {self.T} tokens of a frame")
        self.segment_tokens = -(-self.T // spec.segments_per_frame)
        self.num_segments = -(-self.T // self.segment_tokens)
        self.static_LH = profile.static_mask()
        self.num_layers, self.num_heads = self.static_LH.shape
        self.reset()

    def reset(self) -> None:
        # per layer: layouts of the static and the dynamic group
        self.layouts: list[dict[bool, list[Piece]]] = [{True: [], False: []} for _ in range(self.num_layers)]

    def max_history_tokens(self) -> int:
        """Most history tokens any head holds between blocks (the cache capacity needs this plus one block)."""
        spec = self.spec
        return (spec.sink_frames + spec.recent_frames) * self.T + spec.num_dynamic_segments * self.segment_tokens

    def _choose_segments(self, cache, layer: int, layout: list[Piece], candidates: list[int], boundary: int,
                         heads: list[int]) -> list[tuple[int, int]]:
        """The ``(frame, segment)`` pairs of the candidate frames whose keys change most into the next frame."""
        budget = self.spec.num_dynamic_segments
        if not candidates or budget == 0:
            return []
        chain = candidates + [boundary]
        row_of = self._frame_rows(layout)
        k_BNHD = cache.k[layer].transpose(1, 2)
        scores = segment_scores(k_BNHD, self.T, self.segment_tokens, frame_starts=[row_of[c] for c in chain],
                                heads=heads, backend=cache.backend)  # (B, n, segments)
        scores = scores.mean(0).flatten()
        chosen = scores.topk(min(budget, scores.numel()), largest=False).indices.tolist()
        return sorted((candidates[i // self.num_segments], i % self.num_segments) for i in chosen)

    @staticmethod
    def _frame_rows(layout: list[Piece]) -> dict[int, int]:
        """First history row of every whole frame of a layout."""
        rows, row = {}, 0
        for frame, first, count in layout:
            if first == 0 and count > 0 and frame not in rows:
                rows[frame] = row
            row += count
        return rows

    def after_commit(self, cache, first_frame: int, num_frames: int) -> None:
        """Frames ``first_frame ... + num_frames`` were just committed to every layer of ``cache``: compact it."""
        spec, T = self.spec, self.T
        recent_from = max(first_frame + num_frames - spec.recent_frames, spec.sink_frames)
        for layer in range(self.num_layers):
            keep_lists, new_layouts = [None] * self.num_heads, {}
            for static in (True, False):
                heads = [h for h in range(self.num_heads) if bool(self.static_LH[layer, h]) == static]
                if not heads:
                    continue
                layout = self.layouts[layer][static] + [(first_frame + i, 0, T) for i in range(num_frames)]
                whole = [frame for frame, first, count in layout if first == 0 and count == T]
                sink = [fr for fr in whole if fr < spec.sink_frames]
                recent = [fr for fr in whole if fr >= recent_from]
                segments: list[tuple[int, int]] = []
                candidates = [fr for fr in whole if fr < recent_from and fr >= spec.sink_frames]
                if not static and candidates:  # the frames leaving the recent window, scored into the next frame
                    segments = self._choose_segments(cache, layer, layout, candidates, min(recent), heads)
                new_layouts[static], keep = self._keep(layout, set(sink) | set(recent), segments)
                for h in heads:
                    keep_lists[h] = keep
            cache.compact(layer, keep_lists)
            self.layouts[layer].update(new_layouts)

    def _keep(self, layout: list[Piece], whole_frames: set[int],
              segments: list[tuple[int, int]]) -> tuple[list[Piece], torch.Tensor]:
        """History positions to keep (int64, increasing) and the layout they leave, for whole frames
        ``whole_frames`` and ``(frame, segment)`` bands ``segments`` of whole frames in ``layout``."""
        wanted = set(segments)
        rows, new_layout, row = [], [], 0
        for frame, first, count in layout:
            if frame in whole_frames and first == 0:
                rows.append(torch.arange(row, row + count))
                new_layout.append((frame, first, count))
            elif first == 0 and count == self.T:
                for seg in range(self.num_segments):
                    if (frame, seg) in wanted:
                        lo = seg * self.segment_tokens
                        n = min(self.segment_tokens, self.T - lo)
                        rows.append(torch.arange(row + lo, row + lo + n))
                        new_layout.append((frame, lo, n))
            row += count
        keep = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return new_layout, keep
