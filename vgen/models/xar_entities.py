"""The prediction entity X of xAR ("next-X prediction"): how a square grid of tokens is cut into AR units and in which
order the units (and the tokens inside each unit) are visited.

An entity is a permutation of the grid's raster positions into *sequence order* plus the unit every sequence position
belongs to; units are contiguous in sequence order. The model sees tokens in sequence order everywhere (position
tables, RoPE table re-ordered by the permutation, the unit-level block-causal mask), so a released checkpoint loads
unchanged as long as the order is the official one.

===============  ========  ===========================================================================================
kind             size      units (grid side n)
===============  ========  ===========================================================================================
``cell``         k         (n / k)^2 cells of k x k tokens, cells in raster order, raster inside a cell. Official xAR:
                           n = 16, k = 8 (2 x 2 cells of 64 tokens, the released checkpoints).
``token``        (1)       n^2 single tokens in raster order (next-token prediction; the cell of side 1).
``image``        (n)       one unit: the whole grid (one flow over all tokens; the cell of side n).
``subsample``    d         d^2 dilated groups: group (i, j) holds the tokens (i + d a, j + d b), groups in raster order
                           of (i, j), raster order of (a, b) inside; each group spans the whole image at stride d.
===============  ========  ===========================================================================================

The paper's fifth entity, a *scale* (a coarser view of the image), is not a regrouping of the grid's tokens: it
changes what the tokens are (that is FlowAR, :mod:`vgen.models.flowar`), so it is not offered here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from vgen.errors import UserError

ENTITY_KINDS = ("cell", "token", "image", "subsample")


@dataclass(frozen=True)
class EntityLayout:
    """One entity over an ``grid`` x ``grid`` token grid.

    Attributes:
        kind, size: the entity (``size``: the cell side or the dilation; 1 for ``token``, ``grid`` for ``image``).
        order_L: (L,) int64: the raster position of each sequence position (sequence = unit after unit).
        unit_L: (L,) int64: the unit of each sequence position (non-decreasing).
        unit_sizes: tokens per unit, in AR order.
    """

    kind: str
    size: int
    grid: int
    order_L: torch.Tensor
    unit_L: torch.Tensor
    unit_sizes: tuple[int, ...]

    @property
    def num_units(self) -> int:
        return len(self.unit_sizes)

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid

    @property
    def unit_bounds(self) -> list[tuple[int, int]]:
        """``(start, end)`` sequence positions of every unit."""
        bounds, start = [], 0
        for n in self.unit_sizes:
            bounds.append((start, start + n))
            start += n
        return bounds

    def block_causal_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L, L) bool, True where a query may see a key: every token of its own unit and of the units before it
        (official xAR's ``mask`` buffer, 0 / -inf, as booleans)."""
        unit_L = self.unit_L.to(device)
        return unit_L[:, None] >= unit_L[None, :]

    def to_sequence(self, raster_BLC: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C) in raster order -> sequence order (official ``clusterify``, all cells concatenated)."""
        return raster_BLC[:, self.order_L.to(raster_BLC.device)]

    def to_raster(self, seq_BLC: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C) in sequence order -> raster order (official ``unclusterify``)."""
        out = torch.empty_like(seq_BLC)
        out[:, self.order_L.to(seq_BLC.device)] = seq_BLC
        return out

    def split_units(self, seq_BLC: torch.Tensor) -> list[torch.Tensor]:
        """Sequence-order tokens (B, L, C) -> one (B, n_u, C) tensor per unit."""
        return list(seq_BLC.split(list(self.unit_sizes), dim=1))


def entity_layout(kind: str, grid: int, size: int | None = None) -> EntityLayout:
    """The :class:`EntityLayout` of entity ``kind`` over a ``grid`` x ``grid`` token grid; ``size`` is the cell side
    (``cell``) or the dilation (``subsample``) and must divide ``grid``; one :class:`UserError` line otherwise."""
    if kind not in ENTITY_KINDS:
        raise UserError(f"unknown xAR entity {kind!r}; choose one of {', '.join(ENTITY_KINDS)}")
    if grid < 1:
        raise UserError(f"the xAR token grid side must be >= 1, got {grid}")
    if kind == "token":
        size = 1 if size is None else size
        if size != 1:
            raise UserError(f"the 'token' entity has size 1, got {size} (use entity 'cell' for k x k cells)")
    elif kind == "image":
        size = grid if size is None else size
        if size != grid:
            raise UserError(f"the 'image' entity is the whole {grid}x{grid} grid, got size {size}")
    elif size is None:
        raise UserError(f"the {kind!r} entity needs a size (the cell side or the dilation), dividing {grid}")
    size = int(size)
    if size < 1 or grid % size:
        what = "cell side" if kind in ("cell", "token", "image") else "subsample dilation"
        raise UserError(f"xAR {what} {size} does not divide the {grid}x{grid} token grid; choose a divisor of "
                        f"{grid} ({', '.join(str(d) for d in range(1, grid + 1) if grid % d == 0)})")
    # built on the CPU explicitly: models are also constructed under torch.device("meta") (checkpoint loading)
    raster = torch.arange(grid * grid, device="cpu").view(grid, grid)
    if kind == "subsample":
        # group (i, j) = tokens (i + d a, j + d b): rows of the grid are a * d + i
        order = rearrange(raster, "(a i) (b j) -> (i j a b)", i=size, j=size)
        unit_tokens, num_units = (grid // size) ** 2, size * size
    else:
        # cell (h, w) = tokens (h k + p, w k + q), raster over cells then inside the cell
        order = rearrange(raster, "(h p) (w q) -> (h w p q)", p=size, q=size)
        unit_tokens, num_units = size * size, (grid // size) ** 2
    unit_L = torch.arange(num_units, device="cpu").repeat_interleave(unit_tokens)
    return EntityLayout(kind=kind, size=size, grid=grid, order_L=order, unit_L=unit_L,
                        unit_sizes=(unit_tokens,) * num_units)
