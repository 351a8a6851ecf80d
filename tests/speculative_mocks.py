"""A next-token model whose conditionals are a random lookup table, for the speculative samplers' tests.

:class:`TableModel` implements :class:`vgen.samplers.interfaces.NextTokenModel` with logits that depend on the
condition (a label, -1 = null) and on every unit before the predicted one through random tables, so its exact joint
distribution over all ``(V^k)^N`` outcomes is enumerable (:meth:`TableModel.joint_logits`). Its state mimics the
KV cache's step protocol (tentative decode, ``commit(keep_B)``, ``rollback``, per-row ``truncate``, ``select``) and
refuses what a real cache refuses (a second decode before commit / rollback), so the loops' bookkeeping is checked
too. It is much cheaper than a transformer, which lets the chi-square tests draw tens of thousands of images in
seconds.
"""

from __future__ import annotations

import itertools

import torch


class TableCache:
    """Per-row lengths with one tentative step, like :class:`vgen.kv_cache.FullKVCache`."""

    def __init__(self, batch: int):
        self.lengths_B = torch.zeros(batch, dtype=torch.long)
        self.step = 0

    def commit(self, keep_B=None):
        if not self.step:
            raise ValueError("nothing to commit")
        keep = torch.full_like(self.lengths_B, self.step) if keep_B is None else torch.as_tensor(keep_B).long()
        if (keep < 0).any() or (keep > self.step).any():
            raise ValueError(f"keep_B out of range: {keep.tolist()}")
        self.lengths_B = self.lengths_B + keep
        self.step = 0

    def rollback(self):
        self.step = 0

    def truncate(self, length_B):
        if self.step:
            raise ValueError("open step")
        self.lengths_B = torch.minimum(self.lengths_B, torch.as_tensor(length_B).long())


class TableState:
    def __init__(self, labels_R: torch.Tensor, capacity: int, k: int):
        self.labels_R = labels_R
        self.cache = TableCache(labels_R.numel())
        self.history_RMk = torch.zeros(labels_R.numel(), capacity, k, dtype=torch.long)

    @property
    def units_B(self):
        return self.cache.lengths_B.clone()

    def truncate_units(self, units_B):
        self.cache.truncate(units_B)

    def select(self, index_B):
        index_B = torch.as_tensor(index_B).long()
        if self.cache.step:
            raise ValueError("open step")
        self.labels_R = self.labels_R[index_B]
        self.history_RMk = self.history_RMk[index_B]
        self.cache.lengths_B = self.cache.lengths_B[index_B]


class TableModel:
    """Random conditional tables: ``N`` units of ``k`` codes from a vocabulary of ``V``, ``num_labels`` labels."""

    def __init__(self, seed: int, V: int = 4, N: int = 4, k: int = 1, num_labels: int = 3, scale: float = 1.0,
                 margin: int = 16, iid: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.sequence_length, self.tokens_per_step = V, N, k
        self.unit_values = V**k
        self.margin, self.iid = margin, iid
        # tables[j]: (num_labels + 1, unit_values ** j, k, V): logits of unit j given the label (row 0 = null) and
        # the j units before it (encoded in base unit_values, earliest unit most significant); with ``iid`` one
        # table (num_labels + 1, 1, k, V) serves every position, whatever came before
        sizes = [1] if iid else [self.unit_values**j for j in range(N)]
        self.tables = [torch.randn(num_labels + 1, size, k, V, generator=g) * scale for size in sizes]
        self.decode_calls = 0

    # -- interface ---------------------------------------------------------------------------------------------
    def concat_conditions(self, cond, uncond):
        return torch.cat((cond, uncond))

    def null_condition(self, batch_size):
        return torch.full((batch_size,), -1)

    def prefill(self, cond):
        state = TableState(cond.clone(), self.sequence_length + self.margin + 1, self.tokens_per_step)
        return state, self._logits(state, torch.zeros(len(cond), 1, dtype=torch.long))[:, 0]

    def decode(self, units_Bnk, state):
        if state.cache.step:
            raise ValueError("the previous step was not committed")
        R, n, k = units_Bnk.shape
        start = state.cache.lengths_B
        rows = torch.arange(R)[:, None]
        state.history_RMk[rows, start[:, None] + torch.arange(n)] = units_Bnk
        state.cache.step = n
        self.decode_calls += 1
        return self._logits(state, start[:, None] + 1 + torch.arange(n))

    def to_raster(self, units_BNk):
        return units_BNk.flatten(1)

    # -- tables ------------------------------------------------------------------------------------------------
    def unit_codes(self, units_RMk: torch.Tensor) -> torch.Tensor:
        return (units_RMk * self.vocab_size ** torch.arange(self.tokens_per_step - 1, -1, -1)).sum(-1)

    def _logits(self, state: TableState, position_Rn: torch.Tensor) -> torch.Tensor:
        """Logits (R, n, k, V) of the units at ``position_Rn`` given the history before them (zeros past N)."""
        R, n = position_Rn.shape
        if self.iid:
            return self.tables[0][state.labels_R + 1, 0][:, None].expand(R, n, -1, -1).clone()
        out = torch.zeros(R, n, self.tokens_per_step, self.vocab_size)
        codes_RM = self.unit_codes(state.history_RMk)
        label_R = state.labels_R + 1
        for j in range(self.sequence_length):
            at = position_Rn == j
            if not at.any():
                continue
            weights = self.unit_values ** torch.arange(j - 1, -1, -1)
            prefix_R = (codes_RM[:, :j] * weights).sum(1) if j else torch.zeros(R, dtype=torch.long)
            rows = at.nonzero()
            out[rows[:, 0], rows[:, 1]] = self.tables[j][label_R[rows[:, 0]], prefix_R[rows[:, 0]]]
        return out

    def joint_logits(self, label: int):
        """Every outcome (S, N, k) and the conditional and null logits of each of its units (S, N, k, V)."""
        values = torch.tensor(list(itertools.product(range(self.vocab_size), repeat=self.tokens_per_step)))
        outcomes = torch.stack([torch.stack(u) for u in itertools.product(values, repeat=self.sequence_length)])
        codes = self.unit_codes(outcomes)
        S = outcomes.shape[0]
        cond = torch.zeros(S, self.sequence_length, self.tokens_per_step, self.vocab_size)
        null = torch.zeros_like(cond)
        for j in range(self.sequence_length):
            prefix = (codes[:, :j] * self.unit_values ** torch.arange(j - 1, -1, -1)).sum(1) if j else 0
            cond[:, j] = self.tables[j][label + 1, prefix]
            null[:, j] = self.tables[j][0, prefix]
        return outcomes, cond, null
