"""Segment scoring: how much each segment of a frame changes into the next frame (kernel 3).

Forcing-KV's dynamic-head criterion: for a chain of frames ``f_0, f_1, ..., f_{F-1}`` of ``T`` tokens each, the
cosine similarity between token ``t``'s key in frame ``f`` and in frame ``f + 1`` (the key vector being the
selected heads' keys concatenated, ``len(heads) * D`` wide), averaged over contiguous segments of
``segment_tokens`` tokens (the last segment of a frame may be shorter). Low scores mark the most-changed regions.
Dot products and norms accumulate in float32 in one pass over the keys, in one launch.

Shapes (any strides): ``k`` ``[B, N, H, D]``; frame ``f`` occupies rows ``frame_starts[f] ... + T - 1``
(default ``f * T``); ``heads`` int ``[H_sel]`` (default all heads). Returns ``[B, F - 1, ceil(T / segment_tokens)]``
float32, with ``cos = dot / max(sqrt(|x|^2 |y|^2), eps)``.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from vgen.kernels._dispatch import jit, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

EPS = 1e-8


def _prepare(k, frame_tokens, segment_tokens, num_frames, frame_starts, heads):
    if k.dim() != 4:
        raise ValueError(f"k must be [B, N, H, D], got {tuple(k.shape)}")
    if frame_tokens <= 0 or segment_tokens <= 0:
        raise ValueError(f"frame_tokens and segment_tokens must be positive, got {frame_tokens}, {segment_tokens}")
    if frame_starts is None:
        if num_frames is None:
            num_frames = k.shape[1] // frame_tokens
        frame_starts = torch.arange(num_frames, dtype=torch.int32) * frame_tokens
    frame_starts = torch.as_tensor(frame_starts, dtype=torch.int32, device=k.device)
    if frame_starts.dim() != 1 or frame_starts.numel() < 2:
        raise ValueError(f"need a chain of at least 2 frames, got frame starts {frame_starts.tolist()}")
    if not k.is_cuda and (int(frame_starts.min()) < 0 or int(frame_starts.max()) + frame_tokens > k.shape[1]):
        raise ValueError(f"frames starting at {frame_starts.tolist()} with {frame_tokens} tokens do not fit "
                         f"{k.shape[1]} rows")
    heads = torch.arange(k.shape[2]) if heads is None else heads
    heads = torch.as_tensor(heads, dtype=torch.int32, device=k.device)
    return frame_starts, heads


def segment_scores_reference(k, frame_tokens, segment_tokens, *, num_frames=None, frame_starts=None, heads=None):
    """Plain-PyTorch segment scores (see the module docstring)."""
    frame_starts, heads = _prepare(k, frame_tokens, segment_tokens, num_frames, frame_starts, heads)
    rows = frame_starts.long()[:, None] + torch.arange(frame_tokens, device=k.device)  # [F, T]
    frames = k[:, rows][:, :, :, heads.long()].float()  # [B, F, T, H_sel, D]
    frames = rearrange(frames, "b f t h d -> b f t (h d)")
    x, y = frames[:, :-1], frames[:, 1:]
    dot = (x * y).sum(-1)
    norms = (x * x).sum(-1) * (y * y).sum(-1)
    cos = dot / torch.sqrt(norms).clamp_min(EPS)  # [B, F-1, T]
    n_seg = -(-frame_tokens // segment_tokens)
    padded = torch.nn.functional.pad(cos, (0, n_seg * segment_tokens - frame_tokens))
    sums = reduce(padded, "b f (s t) -> b f s", "sum", t=segment_tokens)
    counts = torch.full((n_seg,), float(segment_tokens), device=k.device)
    counts[-1] = frame_tokens - (n_seg - 1) * segment_tokens
    return sums / counts


if tl is not None:

    def _segment_scores_kernel(
        K, FRAME_START, HEADS, OUT,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_ob, stride_of, stride_os,
        frame_tokens, segment_tokens, num_heads, eps,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program: BLOCK_T tokens of one frame pair (f, f + 1) of one batch element. Each token's cosine,
        # divided by its segment's token count, is added atomically into its segment's score (OUT starts at 0),
        # so the grid has frame_tokens / BLOCK_T programs per pair however long the segments are. Frame pairs
        # vary fastest in the grid so neighbouring programs share a frame in L2.
        f = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        b = tl.program_id(2).to(tl.int64)
        row_x = tl.load(FRAME_START + f)
        row_y = tl.load(FRAME_START + f + 1)
        offs_d = tl.arange(0, BLOCK_D)
        t_mask = t < frame_tokens
        mask = t_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        base = K + b * stride_kb
        ptr_x = base + (row_x + t).to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        ptr_y = base + (row_y + t).to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        dot = tl.zeros([BLOCK_T], tl.float32)
        nx = tl.zeros([BLOCK_T], tl.float32)
        ny = tl.zeros([BLOCK_T], tl.float32)
        for i in range(num_heads):
            col = tl.load(HEADS + i) * stride_kh
            x = tl.load(ptr_x + col, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(ptr_y + col, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(x * y, 1)
            nx += tl.sum(x * x, 1)
            ny += tl.sum(y * y, 1)
        cos = dot / tl.maximum(tl.sqrt(nx * ny), eps)
        seg = t // segment_tokens
        count = tl.maximum(tl.minimum(segment_tokens, frame_tokens - seg * segment_tokens), 1).to(tl.float32)
        tl.atomic_add(OUT + b * stride_ob + f * stride_of + seg * stride_os, cos / count, mask=t_mask)


def segment_scores_triton(k, frame_tokens, segment_tokens, *, num_frames=None, frame_starts=None, heads=None,
                          block_t=None):
    """Triton segment scores (CUDA, or CPU under ``TRITON_INTERPRET=1``); sums are atomic, so the last bits may
    differ between runs on a GPU."""
    frame_starts, heads = _prepare(k, frame_tokens, segment_tokens, num_frames, frame_starts, heads)
    B, _, _, D = k.shape
    n_pairs = frame_starts.numel() - 1
    n_seg = -(-frame_tokens // segment_tokens)
    out = torch.zeros((B, n_pairs, n_seg), device=k.device, dtype=torch.float32)
    block_t = block_t or (32 if k.is_cuda else 16)
    jit(_segment_scores_kernel)[(n_pairs, triton.cdiv(frame_tokens, block_t), B)](
        k, frame_starts, heads, out, *k.stride(), *out.stride(),
        frame_tokens, segment_tokens, heads.numel(), EPS,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=block_t, num_warps=4,
    )
    return out


def segment_scores(k, frame_tokens, segment_tokens, *, num_frames=None, frame_starts=None, heads=None,
                   backend="auto"):
    """Per-segment mean key cosine similarity between consecutive frames, ``[B, F - 1, n_segments]`` float32."""
    fn = segment_scores_triton if resolve_backend(backend, k) == "triton" else segment_scores_reference
    return fn(k, frame_tokens, segment_tokens, num_frames=num_frames, frame_starts=frame_starts, heads=heads)
