"""Text encoders for text-conditional generators.

:class:`ShapesTextEncoder` is a small trainable word-level transformer over a fixed vocabulary (for the Shapes world:
every word a Shapes caption can contain, ``vgen.data.PROMPT_VOCABULARY``) plus ``<pad>`` and ``<null>``; it is
trained together with the generator and saved with it in a pipeline folder. The vocabulary is part of its saved
config, so loading it needs nothing from the data world.

**Using another (pretrained) text encoder.** A generator only needs an object that implements
:class:`TextEncoder`: ``tokenize(prompts) -> (ids_BT, mask_BT)`` and ``forward(ids_BT, mask_BT) -> (pooled_BD,
tokens_BTD)`` with ``config.embed_dim == D``. The VAR transformer projects ``D`` to its own width (``text_proj``,
``text_token_proj``), so set ``text_embed_dim=D`` when creating it. A pretrained encoder stored in a local folder
(e.g. a T5 or CLIP text tower saved with ``save_pretrained``) is used by wrapping it in a ``ModelMixin`` subclass
that implements these two methods (mean- or attention-pool its last hidden states for ``pooled``) and passing it
as the pipeline's ``text_encoder`` component; ``VARPipeline.from_pretrained(dir, text_encoder=my_encoder)``
replaces the stored one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from vgen.errors import UserError, excerpt

PAD_TOKEN = "<pad>"
NULL_TOKEN = "<null>"
_WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@runtime_checkable
class TextEncoder(Protocol):
    """What text-conditional generators need from a text encoder."""

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(ids_BT int64, mask_BT bool)`` on the encoder's device."""
        ...

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled_BD, tokens_BTD)``; padded positions of ``tokens_BTD`` are ignored through ``mask_BT``."""
        ...


def split_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt; punctuation is dropped."""
    return _WORD_RE.findall(prompt.lower())


class WordMixing(nn.Module):
    """Residual mix of each token with its neighbours: ``x + proj(GELU(conv_k(x)))`` over (B, T, D), padded
    positions zeroed first. ``proj`` starts at zero, so the block starts as the identity and can be added to a
    trained encoder without changing what it computes."""

    def __init__(self, embed_dim: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"word mixing needs an odd kernel size >= 1 (words on both sides), got {kernel_size}")
        self.conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2)
        self.act = nn.GELU()
        self.proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        x_BDT = rearrange(x_BTD * mask_BT.unsqueeze(-1).to(x_BTD.dtype), "B T D -> B D T")
        return x_BTD + self.proj(self.act(rearrange(self.conv(x_BDT), "B D T -> B T D")))


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Word embeddings + learned positions -> pre-norm transformer encoder (-> word mixing) -> (pooled (B, D),
    tokens (B, T, D)).

    ``pooled`` is the masked mean of the output tokens followed by a LayerNorm. The empty prompt is the single
    ``<null>`` token, so every prompt has at least one token.

    ``word_mixing=k`` (odd; 0 = off) adds a :class:`WordMixing` block after the encoder, so every output token also
    carries the k-word window around it: a shape word its colour word, the subject of "left of" the relation. Without
    it, a 2-layer encoder trained from scratch with the VAR (the shipped default model's stage 1-2) learned to ignore
    word order: its tokens for "a red circle and a blue square" and "a blue circle and a red square" have cosine
    similarity 0.99999, so colour binding and left/right were left to chance. The block starts as the identity, so
    ``task.init_from`` may add it to an encoder saved without it (:attr:`IDENTITY_WHEN_ABSENT`).
    """

    #: state-dict prefixes of blocks that start as the identity: a saved encoder may lack them
    IDENTITY_WHEN_ABSENT = ("word_mixer.",)

    @register_to_config
    def __init__(
        self,
        vocabulary: Sequence[str] | None = None,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_length: int = 32,
        dropout: float = 0.0,
        word_mixing: int = 0,
    ):
        super().__init__()
        if not vocabulary:
            raise UserError(
                "a word-level text encoder needs its vocabulary (the words prompts may use); for the Shapes world "
                "pass vocabulary=vgen.data.PROMPT_VOCABULARY"
            )
        words = list(vocabulary)
        self.itos = [PAD_TOKEN, NULL_TOKEN, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        # Words and positions start at the same scale (std 0.02 each). With the embedding layer's default N(0, 1)
        # words, positions were 3% of the input and the shipped stage 1-2 encoder never learned word order.
        self.token_embed = nn.Embedding(len(self.itos), embed_dim, padding_idx=0)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        with torch.no_grad():
            self.token_embed.weight[0].zero_()  # <pad>
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, embed_dim).normal_(0, 0.02))
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=round(embed_dim * mlp_ratio), dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(embed_dim)
        self.word_mixer = WordMixing(embed_dim, word_mixing) if word_mixing else None
        self.norm_pooled = nn.LayerNorm(embed_dim)

    @property
    def vocabulary(self) -> list[str]:
        return self.itos[2:]

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(ids_BT, mask_BT)``; raises :class:`UserError` naming any word outside the vocabulary."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            words = split_words(prompt)
            unknown = [w for w in dict.fromkeys(words) if w not in self.stoi or w in (PAD_TOKEN, NULL_TOKEN)]
            if unknown:
                named = ", ".join(excerpt(w, 30) for w in unknown[:8]) + (f" and {len(unknown) - 8} more"
                                                                           if len(unknown) > 8 else "")
                raise UserError(
                    f"unknown word(s) {named} in prompt {excerpt(prompt)}; this model knows: "
                    f"{', '.join(self.vocabulary)}"
                )
            if len(words) > self.config.max_length:
                raise UserError(
                    f"prompt {excerpt(prompt)} has {len(words)} words; this model reads at most "
                    f"{self.config.max_length}"
                )
            rows.append([self.stoi[w] for w in words] or [self.stoi[NULL_TOKEN]])
        T = max(len(r) for r in rows)
        ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
        mask_BT = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids_BT[b, : len(r)] = torch.tensor(r)
            mask_BT[b, : len(r)] = True
        device = self.token_embed.weight.device
        return ids_BT.to(device), mask_BT.to(device)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids_BT`` (B, T) int64, ``mask_BT`` (B, T) bool -> ``pooled_BD`` (B, D), ``tokens_BTD`` (B, T, D)."""
        T = ids_BT.shape[1]
        x_BTD = self.token_embed(ids_BT) + self.pos_embed[:, :T]
        x_BTD = self.norm_out(self.encoder(x_BTD, src_key_padding_mask=~mask_BT.bool()))
        if self.word_mixer is not None:
            x_BTD = self.word_mixer(x_BTD, mask_BT)
        m_BT1 = mask_BT.unsqueeze(-1).to(x_BTD.dtype)
        pooled_BD = (x_BTD * m_BT1).sum(1) / m_BT1.sum(1).clamp_min(1)
        return self.norm_pooled(pooled_BD), x_BTD * m_BT1

    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenize and encode: ``(pooled_BD, tokens_BTD, mask_BT)``."""
        ids_BT, mask_BT = self.tokenize(prompts)
        pooled_BD, tokens_BTD = self(ids_BT, mask_BT)
        return pooled_BD, tokens_BTD, mask_BT
