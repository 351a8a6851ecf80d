"""KV caches for block-autoregressive generators: full, sink + rolling window, and compressed (Forcing-KV).

All three share one interface, so a generator switches cache by config (:func:`make_kv_cache`):

* ``append(k, v)``: store a chunk's keys and values (``[B, Lc, H, D]``), e.g. on the clean pass of a block;
* ``attend(q, k=None, v=None, causal=False)``: attention of ``q`` ``[B, Lq, H, D]`` over the stored history
  plus, if given, the current chunk's ``k``/``v`` (not stored; the noisy passes of a block). One kernel launch;
* ``compact(keep)``: keep only the listed history tokens per head (compressed cache); ``keep=None`` keeps all;
* ``lengths``: history tokens per head, ``[H]``.

Storage is a head-major pool ``[B, H, capacity + chunk_capacity, D]`` per K and V: the history lives in the
first ``capacity`` rows, the current chunk is staged in the last ``chunk_capacity`` rows, and a per-head segment
table tells :func:`vgen.kernels.segment_attention` which rows each head reads, so nothing is concatenated.
The caches live in ``vgen`` (they hold state and policy); ``vgen.kernels`` stays stateless functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

from vgen.errors import UserError
from vgen.kernels import compact_kv, pad_index_lists, segment_attention


class KVCache:
    """Shared storage and attention for the caches below; subclasses define ``append`` and the history table."""

    def __init__(self, *, batch: int, heads: int, head_dim: int, capacity: int, chunk_capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", backend: str = "auto"):
        if min(batch, heads, head_dim, chunk_capacity) <= 0 or capacity < 0:
            raise ValueError(f"cache sizes must be positive, got batch={batch}, heads={heads}, head_dim={head_dim}, "
                             f"capacity={capacity}, chunk_capacity={chunk_capacity}")
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.capacity, self.chunk_capacity = capacity, chunk_capacity
        self.backend = backend
        shape = (batch, heads, capacity + chunk_capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, H, rows, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._table_on_device = None  # (start, length on the CPU, start, length on the device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def lengths(self) -> torch.Tensor:
        """History tokens per head, int64 ``[H]`` (CPU)."""
        return self.history_table()[1].sum(-1).long().cpu()

    def history_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment table of the stored history: int32 ``(start [H, S], length [H, S])`` on the CPU."""
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def compact(self, keep=None) -> None:
        """Full and window caches evict by their own rule: only ``keep=None`` (keep all) is accepted."""
        if keep is not None:
            raise ValueError(f"{type(self).__name__} keeps its own tokens; use CompressedKVCache to choose them")

    def reset(self) -> None:
        raise NotImplementedError

    def _check_chunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (self.batch, self.heads, self.head_dim)
        if k.dim() != 4 or k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != expected:
            raise ValueError(f"k and v must be [B={self.batch}, L, H={self.heads}, D={self.head_dim}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")

    def attend(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
               causal: bool = False, return_lse: bool = False):
        """Attention of ``q`` ``[B, Lq, H, D]`` over the history and the optional current chunk ``k``, ``v``.

        The chunk is copied into the staging rows (a chunk-sized copy, never the history) and read as the last
        segment; ``causal=True`` makes it causal (bottom-right aligned) while the history stays fully visible.
        Returns ``out`` ``[B, Lq, H, D]`` or ``(out, lse [B, H, Lq])``.
        """
        start, length = self.history_table()
        if k is not None:
            self._check_chunk(k, v)
            chunk = k.shape[1]
            if chunk > self.chunk_capacity:
                raise ValueError(f"chunk of {chunk} tokens exceeds chunk_capacity={self.chunk_capacity}")
            rows = slice(self.capacity, self.capacity + chunk)
            self.k[:, :, rows] = rearrange(k, "b l h d -> b h l d")
            self.v[:, :, rows] = rearrange(v, "b l h d -> b h l d")
            start = torch.cat([start, torch.full((self.heads, 1), self.capacity, dtype=torch.int32)], 1)
            length = torch.cat([length, torch.full((self.heads, 1), chunk, dtype=torch.int32)], 1)
        start, length = self._device_table(start, length)
        return segment_attention(q, self.k.transpose(1, 2), self.v.transpose(1, 2), start, length, causal=causal,
                                 return_lse=return_lse, backend=self.backend)

    def _device_table(self, start: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment table on the cache's device, copied only when it changed (all denoising passes of a block
        read the same table)."""
        cached = self._table_on_device
        if cached is None or not (torch.equal(cached[0], start) and torch.equal(cached[1], length)):
            cached = (start, length, start.to(self.device), length.to(self.device))
            self._table_on_device = cached
        return cached[2], cached[3]


class FullKVCache(KVCache):
    """Every appended token is kept, up to ``capacity`` tokens (Self Forcing's 21-frame cache)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.length = 0

    def history_table(self):
        start = torch.zeros((self.heads, 1), dtype=torch.int32)
        return start, torch.full((self.heads, 1), self.length, dtype=torch.int32)

    def append(self, k, v):
        self._check_chunk(k, v)
        end = self.length + k.shape[1]
        if end > self.capacity:
            raise UserError(f"the full KV cache holds {self.capacity} tokens and {end} were appended; raise its "
                            "capacity or use a sink + window or compressed cache")
        self.k[:, :, self.length:end] = rearrange(k, "b l h d -> b h l d")
        self.v[:, :, self.length:end] = rearrange(v, "b l h d -> b h l d")
        self.length = end

    def reset(self):
        self.length = 0


class SinkWindowKVCache(KVCache):
    """The first ``sink_tokens`` tokens forever, plus the most recent ``window_tokens`` tokens in a ring buffer.

    The ring is never shifted: once it wraps, it is read as two segments (oldest piece, then newest piece).
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

    def history_table(self):
        s, p = self.sink_tokens, self.ring_ptr
        row = [[0, self.sink_len], [s + p, self.ring_len - p], [s, p]]  # sink, oldest ring piece, newest piece
        table = torch.tensor(row, dtype=torch.int32).T.contiguous()  # [2, 3]
        return table[0].expand(self.heads, 3).contiguous(), table[1].expand(self.heads, 3).contiguous()

    def _write(self, rows: slice, k, v):
        self.k[:, :, rows] = rearrange(k, "b l h d -> b h l d")
        self.v[:, :, rows] = rearrange(v, "b l h d -> b h l d")

    def append(self, k, v):
        self._check_chunk(k, v)
        to_sink = min(self.sink_tokens - self.sink_len, k.shape[1])
        if to_sink:
            self._write(slice(self.sink_len, self.sink_len + to_sink), k[:, :to_sink], v[:, :to_sink])
            self.sink_len += to_sink
        k, v = k[:, to_sink:][:, -self.window_tokens:], v[:, to_sink:][:, -self.window_tokens:]
        n, s, w = k.shape[1], self.sink_tokens, self.window_tokens
        first = min(n, w - self.ring_ptr)  # up to the end of the ring, then wrap to its start
        self._write(slice(s + self.ring_ptr, s + self.ring_ptr + first), k[:, :first], v[:, :first])
        if n > first:
            self._write(slice(s, s + n - first), k[:, first:], v[:, first:])
        self.ring_ptr = (self.ring_ptr + n) % w
        self.ring_len = min(w, self.ring_len + n)


class CompressedKVCache(KVCache):
    """A history whose length differs per head, shrunk by :meth:`compact` (Forcing-KV, AdaKV-style head budgets).

    Each head's history is contiguous from row 0; ``compact`` gathers the kept tokens of every head into a second
    pool with one :func:`vgen.kernels.compact_kv` launch and swaps the pools.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k_spare = torch.zeros_like(self.k)
        self._v_spare = torch.zeros_like(self.v)
        self._lengths = torch.zeros(self.heads, dtype=torch.int64)

    def reset(self):
        self._lengths.zero_()

    def history_table(self):
        return torch.zeros((self.heads, 1), dtype=torch.int32), self._lengths.to(torch.int32)[:, None].clone()

    def append(self, k, v):
        """Append a chunk to every head's history (one indexed copy; heads may start at different rows)."""
        self._check_chunk(k, v)
        chunk = k.shape[1]
        if int(self._lengths.max()) + chunk > self.capacity:
            raise UserError(f"the compressed KV cache holds {self.capacity} tokens per head and "
                            f"{int(self._lengths.max()) + chunk} were appended; compact it first or raise capacity")
        rows = (self._lengths[:, None] + torch.arange(chunk)).to(self.device)  # [H, Lc]
        heads = torch.arange(self.heads, device=self.device)[:, None]
        self.k[:, heads, rows] = rearrange(k, "b l h d -> b h l d")
        self.v[:, heads, rows] = rearrange(v, "b l h d -> b h l d")
        self._lengths += chunk

    def compact(self, keep: Sequence[torch.Tensor] | torch.Tensor | None = None) -> None:
        """Keep only the listed history positions: ``H`` (per head) or ``G`` (per head group) sorted index lists.

        ``keep`` is a sequence of 1-D integer tensors or an int tensor ``[G, M]`` padded with -1; ``G`` must
        divide ``H``, heads ``g*H/G ... (g+1)*H/G - 1`` share list ``g``. Order is preserved.
        """
        if keep is None:
            return
        index = keep.to(torch.int32).cpu() if isinstance(keep, torch.Tensor) else pad_index_lists(keep)
        if index.dim() != 2 or index.shape[0] == 0 or self.heads % index.shape[0]:
            raise ValueError(f"keep needs H={self.heads} lists or a number of groups dividing it, got "
                             f"{tuple(index.shape)}")
        per_group = self.heads // index.shape[0]
        group_len = self._lengths.view(index.shape[0], per_group).min(1).values  # [G]
        valid = index >= 0
        if (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("padding (-1) in keep must come after the kept positions")
        if (index >= group_len[:, None].to(torch.int32)).any():
            raise ValueError(f"keep lists a position past the history (lengths per group {group_len.tolist()})")
        if ((index[:, 1:] <= index[:, :-1]) & valid[:, 1:]).any():
            raise ValueError("keep lists must be strictly increasing positions")
        compact_kv(self.k.transpose(1, 2), self.v.transpose(1, 2), index.to(self.device),
                   self._k_spare.transpose(1, 2), self._v_spare.transpose(1, 2), backend=self.backend)
        self.k, self._k_spare = self._k_spare, self.k
        self.v, self._v_spare = self._v_spare, self.v
        self._lengths = valid.sum(1).repeat_interleave(per_group).long()


KV_CACHES = {"full": FullKVCache, "sink_window": SinkWindowKVCache, "compressed": CompressedKVCache}


def make_kv_cache(kind: str, **kwargs) -> KVCache:
    """Build a cache by name (``full``, ``sink_window``, ``compressed``), as a generator's config selects it."""
    if kind not in KV_CACHES:
        raise UserError(f"unknown KV cache {kind!r}; choose one of {', '.join(KV_CACHES)}")
    return KV_CACHES[kind](**kwargs)
