"""Class and text conditioning shared by the generator families: one condition object, one set of helpers for
building it from labels or a text encoder's output, the null condition (CFG), condition dropout (CFG training) and
concatenation of conditional and unconditional rows.

A generator mixes :class:`ConditionedModel` into its ``ModelMixin`` and calls :meth:`~ConditionedModel.init_conditioning`
in ``__init__``. The parameters it creates keep the key names of the official checkpoints:

* class models: ``class_emb`` (``num_classes + 1`` rows; the last is the null class), as VAR, FlowAR and xAR name it.
  A family whose checkpoints name it differently overrides :attr:`ConditionedModel.class_table`.
* text models: ``text_proj`` (pooled text -> width) and the learned null prompt ``null_text_cond``; with
  cross-attention also ``text_token_proj`` and ``null_text_token``.

Any text encoder that returns ``(pooled (B, Dt), tokens (B, T, Dt))`` and a mask works (see
:mod:`vgen.models.text_encoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgen.errors import UserError

CONDITIONINGS = ("class", "text")


@dataclass
class Condition:
    """What a generator step is conditioned on, for B rows: ``cond_BD`` (B, C) (class embedding or projected pooled
    text); ``context_BTC`` / ``context_mask_BT`` are projected text tokens for cross-attention (None otherwise)."""

    cond_BD: torch.Tensor
    context_BTC: torch.Tensor | None = None
    context_mask_BT: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.cond_BD.shape[0]

    def rows(self, start: int, end: int) -> Condition:
        """Rows ``start:end`` of every field."""
        if self.context_BTC is None:
            return Condition(self.cond_BD[start:end])
        return Condition(self.cond_BD[start:end], self.context_BTC[start:end], self.context_mask_BT[start:end])

    def index(self, index_B: torch.Tensor) -> Condition:
        """Rows ``index_B`` (keep, reorder or repeat rows)."""
        if self.context_BTC is None:
            return Condition(self.cond_BD[index_B])
        return Condition(self.cond_BD[index_B], self.context_BTC[index_B], self.context_mask_BT[index_B])

    def cat(self, other: Condition) -> Condition:
        """This condition's rows, then ``other``'s (context tokens padded to the longer one)."""
        if self.context_BTC is None:
            return Condition(torch.cat((self.cond_BD, other.cond_BD)))
        T = max(self.context_BTC.shape[1], other.context_BTC.shape[1])

        def pad(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, 0) * (x.ndim - 2) + (0, T - x.shape[1]))

        return Condition(
            torch.cat((self.cond_BD, other.cond_BD)),
            torch.cat((pad(self.context_BTC), pad(other.context_BTC))),
            torch.cat((pad(self.context_mask_BT), pad(other.context_mask_BT))),
        )

    def to(self, dtype: torch.dtype) -> Condition:
        """Floating fields in ``dtype`` (masks stay boolean)."""
        if self.context_BTC is None:
            return Condition(self.cond_BD.to(dtype))
        return Condition(self.cond_BD.to(dtype), self.context_BTC.to(dtype), self.context_mask_BT)


class ConditionedModel:
    """Mixin for generators conditioned on a class label or a prompt (reads ``self.config.conditioning``,
    ``num_classes`` and ``text_cross_attn``)."""

    def init_conditioning(self, conditioning: str, width: int, num_classes: int, text_embed_dim: int | None,
                          text_cross_attn: bool, init_std: float | None = None) -> None:
        """Create the condition parameters (see the module docstring); ``init_std`` defaults to sqrt(1 / 3C)."""
        if conditioning not in CONDITIONINGS:
            raise UserError(f"conditioning must be 'class' or 'text', got {conditioning!r}")
        if conditioning == "text" and not text_embed_dim:
            raise UserError("a text-conditional model needs text_embed_dim (the text encoder's output width)")
        init_std = math.sqrt(1 / width / 3) if init_std is None else init_std
        self.num_classes = num_classes
        if conditioning == "class":
            self.class_emb = nn.Embedding(num_classes + 1, width)
            nn.init.trunc_normal_(self.class_emb.weight, mean=0, std=init_std)
        else:
            self.text_proj = nn.Linear(text_embed_dim, width)
            self.null_text_cond = nn.Parameter(torch.zeros(1, width).normal_(0, init_std))
            if text_cross_attn:
                self.text_token_proj = nn.Linear(text_embed_dim, width)
                self.null_text_token = nn.Parameter(torch.zeros(1, 1, width).normal_(0, init_std))

    @property
    def class_table(self) -> nn.Embedding:
        """The class embedding (``num_classes + 1`` rows, the last the null class)."""
        return self.class_emb

    @property
    def is_text_conditional(self) -> bool:
        return self.config.conditioning == "text"

    def class_condition(self, label_B: torch.Tensor) -> Condition:
        """Condition from class labels (B,) int64; label ``num_classes`` (or any negative label) is the null class."""
        if self.is_text_conditional:
            raise UserError("this model is text-conditional: pass a prompt, not class labels")
        table = self.class_table
        label_B = torch.where(label_B < 0, self.num_classes, label_B).to(table.weight.device)
        return Condition(table(label_B))

    def text_condition(self, pooled_BD: torch.Tensor, tokens_BTD: torch.Tensor | None = None,
                       mask_BT: torch.Tensor | None = None) -> Condition:
        """Condition from a text encoder's pooled embedding (B, Dt) and tokens (B, T, Dt) with mask (B, T)."""
        if not self.is_text_conditional:
            raise UserError(
                "this model is class-conditional: pass class labels, not a prompt "
                f"(labels 0..{self.num_classes - 1})"
            )
        dtype = self.text_proj.weight.dtype
        cond_BD = self.text_proj(pooled_BD.to(dtype))
        if not self.config.text_cross_attn:
            return Condition(cond_BD)
        if tokens_BTD is None or mask_BT is None:
            raise ValueError("this model cross-attends to text tokens: pass tokens_BTD and mask_BT")
        return Condition(cond_BD, self.text_token_proj(tokens_BTD.to(dtype)), mask_BT.bool())

    def null_condition(self, batch_size: int) -> Condition:
        """Unconditional condition: the null class, or the learned null prompt."""
        if not self.is_text_conditional:
            return Condition(self.class_table.weight[self.num_classes].unsqueeze(0).expand(batch_size, -1))
        cond_BD = self.null_text_cond.expand(batch_size, -1)
        if not self.config.text_cross_attn:
            return Condition(cond_BD)
        ctx = self.null_text_token.expand(batch_size, -1, -1)
        return Condition(cond_BD, ctx, torch.ones(batch_size, 1, dtype=torch.bool, device=ctx.device))

    def concat_conditions(self, cond: Condition, uncond: Condition) -> Condition:
        """One condition for a doubled batch: conditional rows first, then unconditional ones."""
        return cond.cat(uncond)

    def drop_condition(self, cond: Condition, drop_B: torch.Tensor) -> Condition:
        """Replace rows where ``drop_B`` is True by the null condition (classifier-free guidance training)."""
        null = self.null_condition(cond.cond_BD.shape[0])
        cond_BD = torch.where(drop_B[:, None], null.cond_BD.to(cond.cond_BD.dtype), cond.cond_BD)
        if cond.context_BTC is None:
            return Condition(cond_BD)
        T = cond.context_BTC.shape[1]
        null_ctx = F.pad(null.context_BTC, (0, 0, 0, T - 1))
        null_mask = F.pad(null.context_mask_BT, (0, T - 1))
        return Condition(
            cond_BD,
            torch.where(drop_B[:, None, None], null_ctx, cond.context_BTC),
            torch.where(drop_B[:, None], null_mask, cond.context_mask_BT),
        )
