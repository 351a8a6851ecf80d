"""KV caches: one protocol for every family (next-scale, next-token, flow units, block-causal video).

A cache holds, for every transformer layer, preallocated key/value pools ``(B, H, rows, c)``; nothing is
concatenated per step. A model's attention layer hands its step's queries, keys and values to the cache, which
stores them (tentatively) and returns the attention output over everything the row may see::

    out_BHlc = cache.attend(layer, q_BHlc, k_BHlc, v_BHlc)      # in every layer of one forward pass
    cache.commit()                                              # the step's tokens become history
    # or cache.commit(keep_B) to keep only the first keep_B[b] of them in row b (speculative verification),
    # or cache.rollback() to drop them all.

Every call of a step must use the same number of new tokens ``l``; each layer is written once per step. With
``store=False`` the step's keys/values are attended to but never kept (the noisy denoising passes of a video
block); no commit follows.

Three variants, chosen by name with :func:`make_kv_cache`:

* :class:`FullKVCache` (``"full"``): every committed token is kept, up to ``capacity``. Rows may hold different
  lengths (after per-row commits or :meth:`~FullKVCache.truncate`); the step's tokens are then written at each row's
  own end and a mask hides what a row may not see. VAR, raster AR, FlowAR, xAR and the full video cache use it.
* :class:`SinkWindowKVCache` (``"sink_window"``): the first ``sink_tokens`` tokens forever plus the most recent
  ``window_tokens`` in a ring buffer that is never shifted (read as two segments once it wraps).
* :class:`CompressedKVCache` (``"compressed"``): a history whose length differs per layer and head, shrunk in place
  by :meth:`~CompressedKVCache.compact` (Forcing-KV, AdaKV-style head budgets).

Every variant describes what a row reads as a per-head *segment table* (:meth:`KVCache.history_table`), the view
:func:`vgen.kernels.segment_attention` takes; the ring and compressed caches always attend through that kernel
(reference implementation on CPU), the full cache through SDPA (``backend="sdpa"``) or the kernel
(``backend="kernels"``). Segment caches keep the same history for every batch row.

Shapes: ``B`` rows, ``H`` heads, ``l`` new tokens, ``c`` head width; ``q/k/v`` are head-major ``(B, H, l, c)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from vgen.errors import UserError
from vgen.kernels import compact_kv, pad_index_lists, segment_attention
from vgen.models.layers import attention


class KVCache:
    """What every cache shares: sizes, the step bookkeeping (tentative tokens, commit / rollback) and checks.

    Subclasses implement :meth:`attend`, :meth:`_commit_step`, :meth:`history_table` and :meth:`reset`.
    """

    def __init__(self, *, batch: int, heads: int, head_dim: int, num_layers: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if min(batch, heads, head_dim, num_layers) <= 0:
            raise ValueError(f"cache sizes must be positive, got batch={batch}, heads={heads}, head_dim={head_dim}, "
                             f"num_layers={num_layers}")
        self.batch, self.heads, self.head_dim, self.num_layers = batch, heads, head_dim, num_layers
        self.dtype, self.device = dtype, torch.device(device)
        self._step_tokens = 0  # new tokens of the open (uncommitted) step; 0 = no step open
        self._step_layers: set[int] = set()

    # -- the step protocol -------------------------------------------------------------------------------------

    def _begin(self, layer: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, store: bool) -> int:
        """Check one layer's step input; open the step on its first stored layer. Returns ``l``."""
        expected = (self.batch, self.heads, self.head_dim)
        if k_BHlc.dim() != 4 or k_BHlc.shape != v_BHlc.shape or (k_BHlc.shape[0], k_BHlc.shape[1],
                                                                  k_BHlc.shape[3]) != expected:
            raise ValueError(f"k and v must be (B={self.batch}, H={self.heads}, l, c={self.head_dim}), got "
                             f"{tuple(k_BHlc.shape)} and {tuple(v_BHlc.shape)}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range: this cache has {self.num_layers} layers")
        n = k_BHlc.shape[2]
        if not store:
            if self._step_tokens:
                raise ValueError("a stored step is open: commit() or rollback() before attending without storing")
            return n
        if self._step_tokens and (layer in self._step_layers or n != self._step_tokens):
            raise ValueError("the previous step was not committed: call commit() or rollback() after each forward pass")
        self._step_tokens = n
        self._step_layers.add(layer)
        return n

    def commit(self, keep_B: torch.Tensor | Sequence[int] | None = None) -> None:
        """The open step's tokens become history: all of them, or the first ``keep_B[b]`` in row ``b``."""
        if not self._step_tokens:
            raise ValueError("nothing to commit: no step is open")
        n = self._step_tokens
        if keep_B is not None:
            keep_B = torch.as_tensor(keep_B, dtype=torch.long).reshape(-1).cpu()
            if keep_B.numel() != self.batch or (keep_B < 0).any() or (keep_B > n).any():
                raise ValueError(f"keep_B needs {self.batch} counts in [0, {n}], got {keep_B.tolist()}")
        self._commit_step(n, keep_B)
        self._step_tokens, self._step_layers = 0, set()

    def rollback(self) -> None:
        """Drop the open step's tokens (nothing of them stays visible)."""
        self._step_tokens, self._step_layers = 0, set()

    # -- implemented by the variants ---------------------------------------------------------------------------

    def attend(self, layer: int, q_BHlc: torch.Tensor, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, *,
               store: bool = True, causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
               return_lse: bool = False):
        """Attention of ``q`` (B, H, l, c) over this layer's history plus the step's ``k``/``v`` (B, H, l, c).

        ``causal=True`` makes the step's own tokens causal (token j sees step tokens <= j); history is always fully
        visible. Returns (B, H, l, c), or ``(out, lse (B, H, l))`` with ``return_lse`` (segment attention only).
        """
        raise NotImplementedError

    def _commit_step(self, n: int, keep_B: torch.Tensor | None) -> None:
        raise NotImplementedError

    def history_table(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment table of the committed history of ``layer``: int32 ``(start, length)``, ``(H, S)`` or, when rows
        differ, ``(B, H, S)``, on the CPU; pool rows of the segments of head h are read in table order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Empty the cache (keep its storage)."""
        raise NotImplementedError

    @property
    def lengths(self) -> torch.Tensor:
        """History tokens per head of layer 0, int64 ``(H,)`` (the longest row where rows differ)."""
        length = self.history_table(0)[1].sum(-1).long()
        return length.amax(0) if length.dim() == 2 else length

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage the cache holds."""
        return sum(t.numel() * t.element_size() for t in self._pools())

    @property
    def history_nbytes(self) -> int:
        """Bytes of the keys and values in the committed history now (every layer, head and row); :attr:`nbytes`
        is the storage allocated for it."""
        tokens = 0
        for layer in range(self.num_layers):
            length = self.history_table(layer)[1]
            tokens += int(length.sum()) * (self.batch if length.dim() == 2 else 1)  # (H, S) tables serve every row
        return 2 * tokens * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _pools(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def select(self, index_B: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows ``index_B`` (e.g. drop finished rows)."""
        raise NotImplementedError

    def clone(self) -> KVCache:
        """An independent copy (storage copied)."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(other, name, value.clone())
            elif isinstance(value, (set, list, dict)):
                setattr(other, name, copy.copy(value))
        return other


# ----------------------------------------------------------------------------------------------------------------------
# Full cache: per-row lengths, SDPA or the segment kernel
# ----------------------------------------------------------------------------------------------------------------------


class FullKVCache(KVCache):
    """Every committed token is kept (up to ``capacity`` per row); rows may hold different lengths.

    Storage: ``k``, ``v`` of shape (num_layers, B, H, capacity, c), allocated once. A step's tokens are written in
    place at each row's end (tentatively: a rollback just leaves them unreferenced), so capacity must cover history
    plus the largest step. While every row holds the same length (VAR, plain next-token decoding) reads are plain
    slices and attention needs no mask.
    """

    def __init__(self, *, capacity: int, backend: str = "sdpa", **kwargs):
        super().__init__(**kwargs)
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if backend not in ("sdpa", "kernels"):
            raise ValueError(f"unknown attention backend {backend!r} for the full cache; choose 'sdpa' or 'kernels'")
        self.capacity, self.backend = capacity, backend
        shape = (self.num_layers, self.batch, self.heads, capacity, self.head_dim)
        self.k = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._initialized = 0  # slots [0, _initialized) of every row hold finite values (masked reads need that)
        self.reset()

    def reset(self) -> None:
        self._len_B = torch.zeros(self.batch, dtype=torch.long)
        self._uniform: int | None = 0  # the common length while every row holds the same number, else None
        self._step_view: tuple | None = None
        self.rollback()

    def _pools(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    @property
    def lengths_B(self) -> torch.Tensor:
        """Committed tokens per row, int64 (B,) on the CPU."""
        return self._len_B.clone()

    @property
    def seq_len(self) -> int:
        """Committed tokens of the longest row."""
        return self._uniform if self._uniform is not None else int(self._len_B.max())

    def positions(self, n: int) -> torch.Tensor:
        """Sequence positions (B, n) of ``n`` new tokens: each row continues from its own length (for RoPE)."""
        return self._len_B[:, None] + torch.arange(n)

    def history_table(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self._uniform is not None:
            return (torch.zeros(self.heads, 1, dtype=torch.int32),
                    torch.full((self.heads, 1), self._uniform, dtype=torch.int32))
        start = torch.zeros(self.batch, self.heads, 1, dtype=torch.int32)
        return start, self._len_B.to(torch.int32)[:, None, None].expand(-1, self.heads, 1).contiguous()

    def _step_layout(self, n: int, causal: bool):
        """Where the step's tokens go and what each query may see, computed once per step shape:
        ``(start, end, rows_Bn, mask)``; ``rows_Bn`` is None while rows are uniform (write a slice)."""
        key = (n, causal, self._uniform, None if self._uniform is not None else tuple(self._len_B.tolist()))
        if self._step_view is not None and self._step_view[0] == key:
            return self._step_view[1]
        end = self.seq_len + n
        if end > self.capacity:
            raise UserError(f"the KV cache holds {self.capacity} tokens per row and {end} were needed; allocate a "
                            "larger capacity (or use a sink + window or compressed cache)")
        if self._uniform is not None:  # every row's slots up to `end` get written now: nothing to initialise
            self._initialized = max(self._initialized, end)
            layout = (self._uniform, end, None, None)
        else:
            if end > self._initialized:  # masked positions are multiplied by 0: they must not hold NaN or inf
                self.k[:, :, :, self._initialized:end].zero_()
                self.v[:, :, :, self._initialized:end].zero_()
                self._initialized = end
            rows_Bn = (self._len_B[:, None] + torch.arange(n)).to(self.device)
            key_pos = torch.arange(end, device=self.device)
            visible_Bn = rows_Bn + 1 if causal else (self._len_B[:, None] + n).to(self.device).expand(-1, n)
            mask_B1nT = key_pos[None, None, None, :] < visible_Bn[:, None, :, None]
            layout = (None, end, rows_Bn, mask_B1nT)
        self._step_view = (key, layout)
        return layout

    def attend(self, layer, q_BHlc, k_BHlc, v_BHlc, *, store=True, causal=False, scale=None, dropout_p=0.0,
               return_lse=False, visible=None):
        """As :meth:`KVCache.attend`; ``visible``: a boolean mask (l, T) over the keys each of the step's queries may
        see, T = the history's length + l, True = visible: several AR units' noisy passes in one call, each query
        seeing the history before its own unit and its own unit's tokens (:meth:`vgen.models.xar.XAR.
        velocity_window`). Only for steps that store nothing (the history is read, the step is not written), on
        rows of equal length and the sdpa backend, without ``causal`` or ``return_lse``."""
        n = self._begin(layer, k_BHlc, v_BHlc, store)
        if visible is not None:
            return self._attend_visible(layer, q_BHlc, k_BHlc, v_BHlc, visible, store, causal, return_lse, scale)
        start, end, rows_Bn, mask = self._step_layout(n, causal and n > 1)
        k_pool, v_pool = self.k[layer], self.v[layer]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHlc, k_BHlc, v_BHlc)):
            return self._attend_with_grad(layer, q_BHlc, k_BHlc, v_BHlc, start, end, rows_Bn, causal, scale,
                                          dropout_p)
        if rows_Bn is None:
            k_pool[:, :, start:end] = k_BHlc
            v_pool[:, :, start:end] = v_BHlc
        else:
            b = torch.arange(self.batch, device=self.device)[:, None]
            k_pool[b, :, rows_Bn] = k_BHlc.transpose(1, 2)
            v_pool[b, :, rows_Bn] = v_BHlc.transpose(1, 2)
        keys, values = k_pool[:, :, :end], v_pool[:, :, :end]
        if self.backend == "kernels" or return_lse:
            start_t, length_t = self.history_table(layer)
            length_t = length_t + n
            out = segment_attention(q_BHlc.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                    start_t.to(self.device), length_t.to(self.device), causal=causal,
                                    sm_scale=scale, return_lse=return_lse)
            if return_lse:
                return out[0].transpose(1, 2), out[1]
            return out.transpose(1, 2)
        if mask is not None:
            return attention(q_BHlc, keys, values, mask, scale=scale, dropout_p=dropout_p)
        return attention(q_BHlc, keys, values, scale=scale, causal=causal and n > 1, dropout_p=dropout_p)

    def _attend_visible(self, layer, q_BHlc, k_BHlc, v_BHlc, visible, store, causal, return_lse, scale):
        if store or causal or return_lse or self.backend == "kernels" or self._uniform is None:
            raise ValueError("a visible mask needs a step that stores nothing, rows of equal length, the sdpa "
                             "backend, no causal step and no return_lse")
        history, n = self._uniform, k_BHlc.shape[2]
        if tuple(visible.shape) != (n, history + n):
            raise ValueError(f"visible must be (l={n}, T={history + n}) booleans, got {tuple(visible.shape)}")
        keys = torch.cat([self.k[layer][:, :, :history], k_BHlc], dim=2)
        values = torch.cat([self.v[layer][:, :, :history], v_BHlc], dim=2)
        return attention(q_BHlc, keys, values, visible.to(device=self.device, dtype=torch.bool), scale=scale)

    def _attend_with_grad(self, layer, q_BHlc, k_BHlc, v_BHlc, start, end, rows_Bn, causal, scale, dropout_p):
        """Attention that gradients flow through (training on the model's own rollouts, e.g. self forcing): the
        history is read as a copy and the pools only ever receive detached values, so later in-place writes to the
        cache cannot invalidate what autograd saved. Needs rows of equal length; attention runs through SDPA."""
        if rows_Bn is not None:
            raise ValueError("attention with gradients through the full cache needs rows of equal length")
        self.k[layer][:, :, start:end] = k_BHlc.detach()  # a stored step (if committed) holds its values
        self.v[layer][:, :, start:end] = v_BHlc.detach()
        keys = torch.cat([self.k[layer][:, :, :start], k_BHlc], 2)
        values = torch.cat([self.v[layer][:, :, :start], v_BHlc], 2)
        return attention(q_BHlc, keys, values, scale=scale, causal=causal and k_BHlc.shape[2] > 1,
                         dropout_p=dropout_p)

    def _commit_step(self, n, keep_B):
        if keep_B is None or bool((keep_B == keep_B[0]).all()):
            grow = n if keep_B is None else int(keep_B[0])
            self._len_B += grow
            if self._uniform is not None:
                self._uniform += grow
        else:
            self._len_B += keep_B
            self._uniform = None

    def truncate(self, length: int | torch.Tensor | Sequence[int]) -> None:
        """Keep at most ``length`` committed tokens (an int for every row, or one per row): a rollback of already
        committed tokens, e.g. rejected speculative drafts. Rows shorter than their ``length`` are left alone."""
        if self._step_tokens:
            raise ValueError("commit() or rollback() the open step before truncating")
        length_B = torch.as_tensor(length, dtype=torch.long).reshape(-1).expand(self.batch).cpu()
        if (length_B < 0).any():
            raise ValueError(f"lengths must be >= 0, got {length_B.tolist()}")
        self._len_B = torch.minimum(self._len_B, length_B)
        first = int(self._len_B[0])
        self._uniform = first if bool((self._len_B == first).all()) else None

    def select(self, index_B):
        if self._step_tokens:
            raise ValueError("commit() or rollback() the open step before selecting rows")
        index_B = torch.as_tensor(index_B, dtype=torch.long).reshape(-1)
        end = self._initialized
        self.k = self.k[:, index_B.to(self.device)]
        self.v = self.v[:, index_B.to(self.device)]
        self._initialized = end
        self._len_B = self._len_B[index_B.cpu()]
        self.batch = index_B.numel()
        first = int(self._len_B[0]) if self.batch else 0
        self._uniform = first if bool((self._len_B == first).all()) else None
        self._step_view = None


# ----------------------------------------------------------------------------------------------------------------------
# Segment caches: the history is a per-head segment table, read by the segment-attention kernel
# ----------------------------------------------------------------------------------------------------------------------


class _SegmentKVCache(KVCache):
    """Pools ``(num_layers, B, H, capacity + chunk_capacity, c)``: history in the first ``capacity`` rows, the step's
    tokens staged in the last ``chunk_capacity`` rows and read as the last segment; commit moves them into the
    history by the variant's rule. Every batch row has the same history."""

    def __init__(self, *, capacity: int, chunk_capacity: int, backend: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if chunk_capacity <= 0 or capacity < 0:
            raise ValueError(f"need capacity >= 0 and chunk_capacity > 0, got {capacity}, {chunk_capacity}")
        self.capacity, self.chunk_capacity, self.backend = capacity, chunk_capacity, backend
        shape = (self.batch, self.heads, capacity + chunk_capacity, self.head_dim)
        # one pool per layer (not one stacked tensor), so that compaction can swap a layer's pool for its spare
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._table_on_device: dict[int, tuple] = {}

    def _pools(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]

    def attend(self, layer, q_BHlc, k_BHlc, v_BHlc=None, *, store=True, causal=False, scale=None, dropout_p=0.0,
               return_lse=False):
        if dropout_p:
            raise ValueError("segment caches serve inference only (no attention dropout)")
        start, length = self.history_table(layer)
        if k_BHlc is not None:
            n = self._begin(layer, k_BHlc, v_BHlc, store)
            if n > self.chunk_capacity:
                raise ValueError(f"a step of {n} tokens exceeds chunk_capacity={self.chunk_capacity}")
            rows = slice(self.capacity, self.capacity + n)
            self.k[layer][:, :, rows] = k_BHlc
            self.v[layer][:, :, rows] = v_BHlc
            start = torch.cat([start, torch.full((self.heads, 1), self.capacity, dtype=torch.int32)], 1)
            length = torch.cat([length, torch.full((self.heads, 1), n, dtype=torch.int32)], 1)
        start, length = self._device_table(layer, start, length)
        out = segment_attention(q_BHlc.transpose(1, 2), self.k[layer].transpose(1, 2),
                                self.v[layer].transpose(1, 2), start, length, causal=causal, sm_scale=scale,
                                return_lse=return_lse, backend=self.backend)
        if return_lse:
            return out[0].transpose(1, 2), out[1]
        return out.transpose(1, 2)

    def _device_table(self, layer: int, start: torch.Tensor, length: torch.Tensor):
        """The segment table on the cache's device, copied only when it changed (every denoising pass of a block
        reads the same table)."""
        cached = self._table_on_device.get(layer)
        if cached is None or not (torch.equal(cached[0], start) and torch.equal(cached[1], length)):
            cached = (start, length, start.to(self.device), length.to(self.device))
            self._table_on_device[layer] = cached
        return cached[2], cached[3]

    def _check_uniform_keep(self, n: int, keep_B: torch.Tensor | None) -> int:
        if keep_B is not None and not bool((keep_B == keep_B[0]).all()):
            raise ValueError(f"{type(self).__name__} keeps one history for every row: commit the same count per row")
        return n if keep_B is None else int(keep_B[0])

    def _staged(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(self.capacity, self.capacity + n)
        return self.k[layer][:, :, rows], self.v[layer][:, :, rows]

    def select(self, index_B):
        if self._step_tokens:
            raise ValueError("commit() or rollback() the open step before selecting rows")
        index_B = torch.as_tensor(index_B, dtype=torch.long).reshape(-1).to(self.device)
        self.k = [pool[index_B] for pool in self.k]
        self.v = [pool[index_B] for pool in self.v]
        self.batch = index_B.numel()

    def clone(self):
        other = super().clone()
        other.k, other.v = [pool.clone() for pool in self.k], [pool.clone() for pool in self.v]
        other._table_on_device = {}
        return other

    def compact(self, layer: int, keep=None) -> None:
        """Only the compressed cache chooses its tokens; the others accept ``keep=None`` (keep all)."""
        if keep is not None:
            raise ValueError(f"{type(self).__name__} keeps its own tokens; use CompressedKVCache to choose them")


class SinkWindowKVCache(_SegmentKVCache):
    """The first ``sink_tokens`` tokens forever, plus the most recent ``window_tokens`` tokens in a ring buffer.

    The ring is never shifted: once it wraps, it is read as two segments (oldest piece, then newest piece). Its
    memory is fixed at allocation, however long the rollout.
    """

    def __init__(self, *, sink_tokens: int, window_tokens: int, **kwargs):
        if sink_tokens < 0 or window_tokens <= 0:
            raise ValueError(f"need sink_tokens >= 0 and window_tokens > 0, got {sink_tokens}, {window_tokens}")
        super().__init__(capacity=sink_tokens + window_tokens, **kwargs)
        self.sink_tokens, self.window_tokens = sink_tokens, window_tokens
        self.reset()

    def reset(self):
        self.sink_len = 0  # sink tokens stored so far
        self.ring_len = 0  # tokens in the ring
        self.ring_ptr = 0  # next ring slot to write, in [0, window_tokens)
        self.rollback()

    def history_table(self, layer: int = 0):
        s, p = self.sink_tokens, self.ring_ptr
        row = [[0, self.sink_len], [s + p, self.ring_len - p], [s, p]]  # sink, oldest ring piece, newest piece
        table = torch.tensor(row, dtype=torch.int32).T.contiguous()  # (2, 3)
        return table[0].expand(self.heads, 3).contiguous(), table[1].expand(self.heads, 3).contiguous()

    def _commit_step(self, n, keep_B):
        n = self._check_uniform_keep(n, keep_B)
        to_sink = min(self.sink_tokens - self.sink_len, n)
        ring_n = min(n - to_sink, self.window_tokens)  # only the newest window_tokens of a long step survive
        skip = n - to_sink - ring_n
        first = min(ring_n, self.window_tokens - self.ring_ptr)  # up to the end of the ring, then wrap to its start
        s = self.sink_tokens
        for layer in self._step_layers:
            k, v = self._staged(layer, n)
            pieces = [(slice(self.sink_len, self.sink_len + to_sink), slice(0, to_sink)),
                      (slice(s + self.ring_ptr, s + self.ring_ptr + first),
                       slice(to_sink + skip, to_sink + skip + first)),
                      (slice(s, s + ring_n - first), slice(to_sink + skip + first, n))]
            for dst, src in pieces:
                self.k[layer][:, :, dst] = k[:, :, src]
                self.v[layer][:, :, dst] = v[:, :, src]
        self.sink_len += to_sink
        self.ring_ptr = (self.ring_ptr + ring_n) % self.window_tokens
        self.ring_len = min(self.window_tokens, self.ring_len + ring_n)


class CompressedKVCache(_SegmentKVCache):
    """A history whose length differs per layer and head, shrunk by :meth:`compact` (Forcing-KV, AdaKV-style
    head budgets).

    Each head's history is contiguous from row 0; ``compact`` gathers the kept tokens of every head of one layer
    into a spare pool with one :func:`vgen.kernels.compact_kv` launch and swaps the pools.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k_spare = torch.zeros_like(self.k[0])
        self._v_spare = torch.zeros_like(self.v[0])
        self.reset()

    def reset(self):
        self._lengths_LH = torch.zeros(self.num_layers, self.heads, dtype=torch.int64)
        self.rollback()

    def _pools(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self._k_spare, self._v_spare]

    def head_lengths(self, layer: int = 0) -> torch.Tensor:
        """History tokens per head of ``layer``, int64 (H,)."""
        return self._lengths_LH[layer].clone()

    def history_table(self, layer: int = 0):
        length = self._lengths_LH[layer].to(torch.int32)[:, None].clone()
        return torch.zeros((self.heads, 1), dtype=torch.int32), length

    def _commit_step(self, n, keep_B):
        n = self._check_uniform_keep(n, keep_B)
        for layer in self._step_layers:
            lengths = self._lengths_LH[layer]
            if int(lengths.max()) + n > self.capacity:
                raise UserError(f"the compressed KV cache holds {self.capacity} tokens per head and "
                                f"{int(lengths.max()) + n} were appended; compact it first or raise capacity")
            k, v = self._staged(layer, n)
            rows = (lengths[:, None] + torch.arange(n)).to(self.device)  # (H, n): heads continue at their own row
            heads = torch.arange(self.heads, device=self.device)[:, None]
            self.k[layer][:, heads, rows] = k
            self.v[layer][:, heads, rows] = v
            self._lengths_LH[layer] += n

    def compact(self, layer: int, keep: Sequence[torch.Tensor] | torch.Tensor | None = None) -> None:
        """Keep only the listed history positions of ``layer``: ``H`` (per head) or ``G`` (per head group) sorted
        index lists.

        ``keep`` is a sequence of 1-D integer tensors or an int tensor ``(G, M)`` padded with -1; ``G`` must
        divide ``H``, heads ``g*H/G ... (g+1)*H/G - 1`` share list ``g``. Order is preserved.
        """
        if keep is None:
            return
        if self._step_tokens:
            raise ValueError("commit() or rollback() the open step before compacting")
        index = keep.to(torch.int32).cpu() if isinstance(keep, torch.Tensor) else pad_index_lists(keep)
        if index.dim() != 2 or index.shape[0] == 0 or self.heads % index.shape[0]:
            raise ValueError(f"keep needs H={self.heads} lists or a number of groups dividing it, got "
                             f"{tuple(index.shape)}")
        per_group = self.heads // index.shape[0]
        group_len = self._lengths_LH[layer].view(index.shape[0], per_group).min(1).values  # (G,)
        valid = index >= 0
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("padding (-1) in keep must come after the kept positions")
        if (index >= group_len[:, None].to(torch.int32)).any():
            raise ValueError(f"keep lists a position past the history (lengths per group {group_len.tolist()})")
        if ((index[:, 1:] <= index[:, :-1]) & valid[:, 1:]).any():
            raise ValueError("keep lists must be strictly increasing positions")
        compact_kv(self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2), index.to(self.device),
                   self._k_spare.transpose(1, 2), self._v_spare.transpose(1, 2), backend=self.backend)
        self.k[layer], self._k_spare = self._k_spare, self.k[layer]
        self.v[layer], self._v_spare = self._v_spare, self.v[layer]
        self._lengths_LH[layer] = valid.sum(1).repeat_interleave(per_group).long()

    def select(self, index_B):
        super().select(index_B)
        self._k_spare = torch.zeros_like(self.k[0])
        self._v_spare = torch.zeros_like(self.v[0])


KV_CACHES = {"full": FullKVCache, "sink_window": SinkWindowKVCache, "compressed": CompressedKVCache}


def make_kv_cache(kind: str, **kwargs) -> KVCache:
    """Build a cache by name (``full``, ``sink_window``, ``compressed``), as a generator's config selects it."""
    if kind not in KV_CACHES:
        raise UserError(f"unknown KV cache {kind!r}; choose one of {', '.join(KV_CACHES)}")
    return KV_CACHES[kind](**kwargs)
