"""Official VAR checkpoints (``var_dXX.pth`` of FoundationVision/VAR) -> :class:`vgen.models.var.VAR`.

The architecture (depth, width, heads, vocabulary, classes, shared AdaLN, scale schedule) is read from the tensors;
keys are compared with :func:`vgen.checkpoints.state_dict_mismatch`, so a file that does not match raises one
:class:`UserError` naming the missing, unexpected and reshaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vgen.checkpoints import read_state_dict, state_dict_mismatch
from vgen.errors import UserError
from vgen.models.var import PATCH_NUMS_256, PATCH_NUMS_512, VAR

#: Buffers official files carry that vgen recomputes (or, for zero_k_bias, never needs).
OFFICIAL_RECOMPUTED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def _is_recomputed_buffer(key: str) -> bool:
    return key in OFFICIAL_RECOMPUTED_BUFFERS or key.endswith(".attn.zero_k_bias")


def _patch_nums_for_length(L: int, num_scales: int) -> tuple[int, ...]:
    for pns in (PATCH_NUMS_256, PATCH_NUMS_512):
        if sum(p * p for p in pns) == L and len(pns) == num_scales:
            return pns
    raise UserError(
        f"cannot infer the scale schedule of a VAR checkpoint with {L} tokens over {num_scales} scales; "
        "pass patch_nums explicitly"
    )


def official_var_config(sd: Mapping[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None) -> dict[str, Any]:
    """VAR constructor kwargs inferred from an official state dict (depth, width, heads, shared AdaLN, ...)."""
    required = ("pos_1LC", "class_emb.weight", "word_embed.weight", "head.weight", "lvl_embed.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not an official VAR checkpoint: missing key(s) {', '.join(missing)}")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise UserError("not an official VAR checkpoint: no 'blocks.N.*' keys")
    C = sd["pos_1LC"].shape[-1]
    L = sd["pos_1LC"].shape[1]
    num_scales = sd["lvl_embed.weight"].shape[0]
    scale_mul = sd.get("blocks.0.attn.scale_mul_1H11")
    num_heads = scale_mul.numel() if scale_mul is not None else max(1, C // 64)
    if patch_nums is None:
        patch_nums = _patch_nums_for_length(L, num_scales)
    return dict(
        vocab_size=sd["head.weight"].shape[0],
        Cvae=sd["word_embed.weight"].shape[1],
        patch_nums=tuple(patch_nums),
        depth=depth,
        embed_dim=C,
        num_heads=num_heads,
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C if "blocks.0.ffn.fc1.weight" in sd else 4.0,
        shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=scale_mul is not None,
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        conditioning="class",
    )


def load_official_var(
    path_or_sd: str | Path | Mapping[str, torch.Tensor],
    patch_nums: tuple[int, ...] | None = None,
    **overrides: Any,
) -> VAR:
    """Build a :class:`VAR` from an official ``var_dXX.pth`` (plain state dict or a training checkpoint).

    Depth, width, heads, vocabulary, number of classes and shared AdaLN are read from the tensors; ``overrides``
    (e.g. ``cond_drop_rate``, ``drop_path_rate``) go to the constructor. Raises :class:`UserError` listing missing
    or unexpected keys if the file does not match the official layout.
    """
    if not isinstance(path_or_sd, Mapping) and not Path(path_or_sd).exists():
        raise UserError(f"VAR checkpoint not found: {path_or_sd} (pass the official var_dXX.pth file)")
    # training checkpoints: {'trainer': {'var_wo_ddp': ...}, ...}
    sd = read_state_dict(path_or_sd, what="VAR checkpoint", wrapper_keys=("trainer.var_wo_ddp",))
    sd = {k: v for k, v in sd.items() if not _is_recomputed_buffer(k)}
    for k, v in list(sd.items()):  # some forks store scale_mul as (1, 1, H, 1)
        if k.endswith("attn.scale_mul_1H11") and v.ndim == 4 and v.shape[1] == 1:
            sd[k] = v.reshape(1, -1, 1, 1)
    config = {**official_var_config(sd, patch_nums), **overrides}
    with torch.device("meta"):
        model = VAR(**config)
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise UserError(f"the VAR checkpoint does not match the official layout; {mismatch}")
    # Allocate without running the random init (seconds to minutes for d16..d36), then fill every tensor.
    model = model.to_empty(device="cpu")
    model.register_masks(device="cpu")
    model.load_state_dict(sd, strict=True)
    return model.eval()
