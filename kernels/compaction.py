"""Compaction: gather K and V rows by per-head (or per head-group) index lists into a destination buffer (kernel 2).

Shapes (any strides; a head-major buffer ``[B, H, N, D]`` is passed as ``buf.transpose(1, 2)``):

* ``k_src``, ``v_src``: ``[B, N_src, H, D]``; ``k_dst``, ``v_dst``: ``[B, N_dst, H, D]``;
* ``index``: integer ``[G, M]`` with ``G`` dividing ``H``: heads ``g*H/G ... (g+1)*H/G - 1`` share list ``g``
  (``G = H`` is per-head, ``G = 1`` is one list for all heads). Entries ``< 0`` are padding and write nothing,
  so lists of different lengths fit one tensor.

Effect: ``dst[b, dst_start + j, h] = src[b, index[h // (H // G), j], h]`` for every ``index >= 0``, for K and V in
one launch. The destination rows must not overlap source rows still to be read (use a second buffer).
"""

from __future__ import annotations

import torch
from vgen.kernels._dispatch import jit, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _check_inputs(k_src, v_src, index, k_dst, v_dst, dst_start):
    if k_src.dim() != 4 or k_src.shape != v_src.shape:
        raise ValueError(f"k_src and v_src must be equal [B, N, H, D], got {tuple(k_src.shape)}, {tuple(v_src.shape)}")
    B, _, H, D = k_src.shape
    if k_dst.dim() != 4 or k_dst.shape != v_dst.shape or (k_dst.shape[0], k_dst.shape[2], k_dst.shape[3]) != (B, H, D):
        raise ValueError(f"k_dst and v_dst must be equal [B={B}, N, H={H}, D={D}], got {tuple(k_dst.shape)}, "
                         f"{tuple(v_dst.shape)}")
    if index.dim() != 2 or index.shape[0] == 0 or H % index.shape[0] != 0:
        raise ValueError(f"index must be [G, M] with G dividing H={H}, got {tuple(index.shape)}")
    if dst_start < 0 or dst_start + index.shape[1] > k_dst.shape[1]:
        raise ValueError(f"rows [{dst_start}, {dst_start + index.shape[1]}) do not fit a destination of "
                         f"{k_dst.shape[1]} rows")
    # Value check only off the GPU (it would synchronize); the cache objects validate their keep lists.
    if not index.is_cuda and index.numel() and int(index.max()) >= k_src.shape[1]:
        raise ValueError(f"index {int(index.max())} out of range for a source of {k_src.shape[1]} rows")


def compact_kv_reference(k_src, v_src, index, k_dst, v_dst, *, dst_start: int = 0) -> None:
    """Plain-PyTorch compaction (advanced indexing); writes into ``k_dst`` and ``v_dst``."""
    _check_inputs(k_src, v_src, index, k_dst, v_dst, dst_start)
    H = k_src.shape[2]
    per_head = index.to(k_src.device).long().repeat_interleave(H // index.shape[0], dim=0)  # [H, M]
    heads, slots = (per_head >= 0).nonzero(as_tuple=True)
    rows = per_head[heads, slots]
    k_dst[:, dst_start + slots, heads] = k_src[:, rows, heads]
    v_dst[:, dst_start + slots, heads] = v_src[:, rows, heads]


if tl is not None:

    def _compaction_kernel(
        K_SRC, V_SRC, K_DST, V_DST, INDEX,
        stride_ksb, stride_ksn, stride_ksh, stride_ksd,
        stride_vsb, stride_vsn, stride_vsh, stride_vsd,
        stride_kdb, stride_kdn, stride_kdh, stride_kdd,
        stride_vdb, stride_vdn, stride_vdh, stride_vdd,
        stride_ig, stride_im,
        M, heads_per_group, dst_start,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program: BLOCK_T destination rows of one (batch, head), K and V.
        pid_t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        slots = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        idx = tl.load(INDEX + (h // heads_per_group) * stride_ig + slots * stride_im, mask=slots < M, other=-1)
        mask = (idx >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
        src_row = idx.to(tl.int64)[:, None]
        dst_row = (dst_start + slots).to(tl.int64)[:, None]
        k = tl.load(K_SRC + b * stride_ksb + h * stride_ksh + src_row * stride_ksn + offs_d[None, :] * stride_ksd,
                    mask=mask)
        tl.store(K_DST + b * stride_kdb + h * stride_kdh + dst_row * stride_kdn + offs_d[None, :] * stride_kdd,
                 k, mask=mask)
        v = tl.load(V_SRC + b * stride_vsb + h * stride_vsh + src_row * stride_vsn + offs_d[None, :] * stride_vsd,
                    mask=mask)
        tl.store(V_DST + b * stride_vdb + h * stride_vdh + dst_row * stride_vdn + offs_d[None, :] * stride_vdd,
                 v, mask=mask)


def compact_kv_triton(k_src, v_src, index, k_dst, v_dst, *, dst_start: int = 0, block_t: int | None = None) -> None:
    """Triton compaction (CUDA, or CPU under ``TRITON_INTERPRET=1``), one launch for K and V."""
    _check_inputs(k_src, v_src, index, k_dst, v_dst, dst_start)
    B, _, H, D = k_src.shape
    index = index.to(device=k_src.device, dtype=torch.int32)
    M = index.shape[1]
    if M == 0:
        return
    block_t = block_t or (64 if k_src.is_cuda else 16)
    grid = (triton.cdiv(M, block_t), H, B)
    jit(_compaction_kernel)[grid](
        k_src, v_src, k_dst, v_dst, index,
        *k_src.stride(), *v_src.stride(), *k_dst.stride(), *v_dst.stride(), *index.stride(),
        M, H // index.shape[0], dst_start,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=block_t, num_warps=4,
    )


def compact_kv(k_src, v_src, index, k_dst, v_dst, *, dst_start: int = 0, backend: str = "auto") -> None:
    """Gather K/V rows per head (group) into ``k_dst``/``v_dst`` (see the module docstring)."""
    if resolve_backend(backend, k_src) == "triton":
        compact_kv_triton(k_src, v_src, index, k_dst, v_dst, dst_start=dst_start)
    else:
        compact_kv_reference(k_src, v_src, index, k_dst, v_dst, dst_start=dst_start)


def pad_index_lists(lists, device=None) -> torch.Tensor:
    """Stack 1-D index tensors of different lengths into an int32 ``[G, max_len]`` tensor padded with -1."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), width), -1, dtype=torch.int32, device=device)
    for g, x in enumerate(lists):
        out[g, : len(x)] = torch.as_tensor(x, dtype=torch.int32, device=device)
    return out
