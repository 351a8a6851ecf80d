"""Attention of a query chunk over a KV cache whose length differs per head (kernel 1).

The cache is a pool of K/V rows; which rows head ``h`` attends to is a *segment table*: segment ``s`` of head
``h`` covers pool rows ``[start[h, s], start[h, s] + length[h, s])`` and the head's key sequence is its segments
concatenated in table order. Sink, both pieces of a wrapped ring buffer, a dynamic buffer and the current chunk
are thus read in place, without ``torch.cat``. Unused table slots have length 0.

Shapes (any strides; a head-major pool ``[B, H, N, D]`` is passed as ``pool.transpose(1, 2)``):

* ``q``: ``[B, Lq, H, D]``; ``k``, ``v``: ``[B, N, H, D]``; ``D`` in {16, 32, 64, 128, 256};
* ``seg_start``, ``seg_len``: integer ``[H, S]`` (shared by the batch) or ``[B, H, S]``;
* returns ``out`` ``[B, Lq, H, D]`` in ``q``'s dtype and, if asked, ``lse`` ``[B, H, Lq]`` float32 (natural log).

``causal=True`` is bottom-right aligned (as in FlashAttention): query ``i`` sees position ``p`` of its head's
sequence of length ``L_h`` iff ``p <= i + L_h - Lq``. With the current chunk as the last segment and
``Lq`` equal to its length, the history is fully visible and the chunk is causal. A query that sees no key
gets output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from vgen.kernels._dispatch import dot_precision, jit, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = tl = None


TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _check_inputs(q, k, v, seg_start, seg_len):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, N, H={H}, D={D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if seg_start.shape != seg_len.shape or seg_start.dim() not in (2, 3) or seg_start.shape[-2] != H:
        raise ValueError(f"segment tables must both be [H={H}, S] or [B, H, S], got {tuple(seg_start.shape)} "
                         f"and {tuple(seg_len.shape)}")
    if seg_start.dim() == 3 and seg_start.shape[0] != B:
        raise ValueError(f"a batched segment table needs B={B} rows, got {seg_start.shape[0]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def segment_rows(seg_start: torch.Tensor, seg_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand a segment table ``[..., S]`` into pool rows ``[..., Lmax]`` and a validity mask ``[..., Lmax]``.

    ``rows[..., p]`` is the pool row of position ``p`` of the concatenated sequence (0 where ``p`` is past the end).
    """
    seg_start, seg_len = seg_start.long(), seg_len.long()
    ends = seg_len.cumsum(-1)  # [..., S]
    total = ends[..., -1:] if ends.shape[-1] else torch.zeros_like(seg_len[..., :1])
    lmax = int(total.max()) if total.numel() else 0
    pos = torch.arange(lmax, device=seg_len.device).expand(*seg_len.shape[:-1], lmax).contiguous()
    seg = torch.searchsorted(ends.contiguous(), pos, right=True).clamp_(max=max(seg_len.shape[-1] - 1, 0))
    before = (ends - seg_len).gather(-1, seg)  # positions before the segment
    rows = seg_start.gather(-1, seg) + pos - before
    valid = pos < total
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def segment_attention_reference(q, k, v, seg_start, seg_len, *, causal=False, sm_scale=None):
    """Plain-PyTorch segment attention in float32 (the test oracle). Returns ``(out, lse)``; see the module doc."""
    _check_inputs(q, k, v, seg_start, seg_len)
    B, Lq, H, D = q.shape
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    start = seg_start.to(q.device).expand(B, *seg_start.shape[-2:]) if seg_start.dim() == 2 else seg_start.to(q.device)
    length = seg_len.to(q.device).expand(B, *seg_len.shape[-2:]) if seg_len.dim() == 2 else seg_len.to(q.device)
    rows, valid = segment_rows(start, length)  # [B, H, Lmax]
    head_idx = torch.arange(H, device=q.device)[None, :, None]
    batch_idx = torch.arange(B, device=q.device)[:, None, None]
    k_bhld = k[batch_idx, rows, head_idx].float()  # [B, H, Lmax, D]
    v_bhld = v[batch_idx, rows, head_idx].float()
    q_bhld = rearrange(q, "b l h d -> b h l d").float()

    scores = torch.matmul(q_bhld, k_bhld.transpose(-1, -2)) * sm_scale  # [B, H, Lq, Lmax]
    visible = valid[:, :, None, :]
    if causal:
        total = length.long().sum(-1)  # [B, H]
        pos = torch.arange(rows.shape[-1], device=q.device)
        limit = torch.arange(Lq, device=q.device)[None, None, :] + total[:, :, None] - Lq  # [B, H, Lq]
        visible = visible & (pos[None, None, None, :] <= limit[..., None])
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_full((B, H, Lq, 1), float("-inf"))
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs, v_bhld) / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for queries that see nothing
    return rearrange(out, "b h l d -> b l h d").to(q.dtype), lse


if tl is not None:

    def _segment_attention_kernel(
        Q, K, V, O, LSE, SEG_START, SEG_LEN,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_ol, stride_oh, stride_od,
        stride_lb, stride_lh, stride_ll,
        stride_sb, stride_sh, stride_ss,
        Lq, H, S, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program: BLOCK_M queries of one (batch, head); loop over the head's segments, BLOCK_N keys at a time,
        # online softmax in base 2 with float32 accumulators.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_mask = offs_m < Lq

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=q_mask[:, None], other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        table = b * stride_sb + h * stride_sh
        total = tl.load(SEG_LEN + table) * 0  # the head's key count (int32 scalar): a first pass over the table
        for s in range(S):
            total += tl.load(SEG_LEN + table + s * stride_ss)
        # Last key position any query of this block may see (causal), as an offset in the head's sequence.
        last_visible = pid_m * BLOCK_M + BLOCK_M - 1 + total - Lq

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        pos0 = total * 0  # position of the current segment's first key in the head's sequence
        for s in range(S):
            start = tl.load(SEG_START + table + s * stride_ss)
            length = tl.load(SEG_LEN + table + s * stride_ss)
            hi = length
            if CAUSAL:
                hi = tl.minimum(length, tl.maximum(last_visible - pos0 + 1, 0))
            for n0 in range(0, hi, BLOCK_N):
                rows = n0 + offs_n
                valid = rows < length
                prow = (start + rows).to(tl.int64)
                k = tl.load(k_base + prow[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                            mask=valid[None, :], other=0.0)
                qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
                keep = valid[None, :]
                if CAUSAL:
                    keep = keep & ((pos0 + rows)[None, :] <= (offs_m + total - Lq)[:, None])
                qk = tl.where(keep, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + prow[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=valid[:, None], other=0.0)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
                m_i = m_new
            pos0 += length

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=q_mask[:, None])
        if RETURN_LSE:
            log_l = tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))
            lse = tl.where(l_i > 0.0, (m_i + log_l) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_ll, lse, mask=q_mask)


def _default_blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch on ``q``'s device."""
    D = q.shape[-1]
    if not q.is_cuda:  # interpreter: small tiles keep numpy fast and exercise the tail masks
        return 16, 16, 1, 1
    if q.dtype == torch.float32:
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def segment_attention_triton(q, k, v, seg_start, seg_len, *, causal=False, sm_scale=None, return_lse=False,
                             block_m=None, block_n=None):
    """Triton segment attention (CUDA, or CPU under ``TRITON_INTERPRET=1``). Returns ``(out, lse or None)``."""
    _check_inputs(q, k, v, seg_start, seg_len)
    B, Lq, H, D = q.shape
    if D not in TRITON_HEAD_DIMS:
        raise ValueError(f"head dim must be a power of two in [16, 256] for the Triton kernel, got {D}")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    bm, bn, num_warps, num_stages = _default_blocks(q)
    bm, bn = block_m or bm, block_n or bn

    start = seg_start.to(device=q.device, dtype=torch.int32)
    length = seg_len.to(device=q.device, dtype=torch.int32)
    if start.dim() == 2:
        start, length = start[None], length[None]  # broadcast over the batch with stride 0
    start, length = start.contiguous(), length.contiguous()
    if start.shape[-1] == 0:  # no segments at all: every query sees nothing
        start = length = torch.zeros((*start.shape[:-1], 1), dtype=torch.int32, device=q.device)
    table_b = 0 if start.shape[0] == 1 else start.stride(0)

    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if return_lse else out
    lse_strides = lse.stride() if return_lse else (0, 0, 0)
    grid = (triton.cdiv(Lq, bm), B * H)
    jit(_segment_attention_kernel)[grid](
        q, k, v, out, lse, start, length,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse_strides,
        table_b, start.stride(1), start.stride(2),
        Lq, H, start.shape[-1], sm_scale * 1.4426950408889634,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, RETURN_LSE=return_lse,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, (lse if return_lse else None)


def segment_attention(q, k, v, seg_start, seg_len, *, causal=False, sm_scale=None, return_lse=False,
                      backend="auto"):
    """Attention of ``q`` over per-head segment tables of a K/V pool (see the module docstring for shapes).

    ``backend``: ``"auto"`` (Triton on CUDA, reference on CPU), ``"triton"`` or ``"reference"``.
    Returns ``out`` or, with ``return_lse=True``, ``(out, lse)``.
    """
    chosen = resolve_backend(backend, q)
    if chosen == "triton" and backend == "auto" and q.shape[-1] not in TRITON_HEAD_DIMS:
        chosen = "reference"  # the Triton kernel needs a power-of-two head dim; "auto" never fails over it
    if chosen == "triton":
        out, lse = segment_attention_triton(q, k, v, seg_start, seg_len, causal=causal, sm_scale=sm_scale,
                                            return_lse=return_lse)
    else:
        out, lse = segment_attention_reference(q, k, v, seg_start, seg_len, causal=causal, sm_scale=sm_scale)
    return (out, lse) if return_lse else out
