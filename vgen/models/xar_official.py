"""Official xAR checkpoints (``xAR-{B,L,H}.pth`` of OliverRensu/xAR) -> :class:`vgen.models.xar.XAR`.

The released files are plain state dicts that the official ``eval.py`` loads strictly. Besides the parameters they
carry buffers: ``mask`` (1, 1, 256, 256), the cell-causal mask, and in every attention ``rope.freqs`` (head_dim / 4
frequencies) and ``rope.freqs_cos`` / ``rope.freqs_sin`` (256, head_dim), the RoPE table in cell order. All of them
are recomputed from the entity (official: 2 x 2 cells of 8 x 8 tokens) and dropped from the file; a file whose
frequencies are not the official ones is refused. Every parameter is loaded strictly, keys compared with
:func:`vgen.checkpoints.check_state_dict`, so a file that does not match raises one :class:`~vgen.errors.UserError`.

The architecture (widths, depths, heads, grid, number of classes) is read from the tensors; ``overrides`` go to the
constructor (e.g. ``label_drop_prob`` for fine-tuning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vgen.checkpoints import check_state_dict, read_state_dict
from vgen.errors import UserError
from vgen.models.flowar_official import heads_from_rope, recompute_rope_frequencies, stack_depth
from vgen.models.xar import XAR, XAR_SAMPLING, XAR_SIZES

#: buffers official files carry that vgen recomputes (as non-persistent buffers of the model)
OFFICIAL_MASK_KEY = "mask"
_ROPE_SUFFIXES = (".rope.freqs", ".rope.freqs_cos", ".rope.freqs_sin")
#: official heads per width when a file has no ``rope.freqs`` to read the head width from
_OFFICIAL_HEADS = {768: 12, 1024: 16, 1280: 16}


def _is_rope_buffer(key: str) -> bool:
    return key.endswith(_ROPE_SUFFIXES)


def official_xar_config(sd: Mapping[str, torch.Tensor], **given: Any) -> dict[str, Any]:
    """XAR constructor kwargs inferred from an official state dict; ``given`` ones win."""
    required = ("class_emb.weight", "time_embed.mlp.0.weight", "z_proj.weight", "encoder_pos_embed_learned",
                "decoder_embed.weight", "pred.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not an official xAR checkpoint: missing key(s) {', '.join(missing)}")
    De, Dd = sd["class_emb.weight"].shape[1], sd["decoder_embed.weight"].shape[0]
    L = sd["encoder_pos_embed_learned"].shape[1]
    grid = math.isqrt(L)
    if grid * grid != L or grid % 2:
        raise UserError(f"cannot read xAR's token grid from {L} position-table rows (official: 256 = 16 x 16, cut "
                        "into 2 x 2 cells)")
    return dict(
        latent_channels=sd["z_proj.weight"].shape[1],
        patch_size=1,
        grid_size=grid,
        entity="cell",
        entity_size=grid // 2,  # official: clusters = 4, i.e. 2 x 2 cells
        encoder_embed_dim=De,
        encoder_depth=stack_depth(sd, "encoder_blocks."),
        encoder_num_heads=heads_from_rope(sd, "encoder_blocks.0.attn.rope.freqs", De,
                                          given.get("encoder_num_heads", _OFFICIAL_HEADS.get(De))),
        decoder_embed_dim=Dd,
        decoder_depth=stack_depth(sd, "decoder_blocks."),
        decoder_num_heads=heads_from_rope(sd, "decoder_blocks.0.attn.rope.freqs", Dd,
                                          given.get("decoder_num_heads", _OFFICIAL_HEADS.get(Dd))),
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        conditioning="class",
    ) | given


def official_size_name(config: Mapping[str, Any]) -> str | None:
    """``"xar-b"`` / ``"xar-l"`` / ``"xar-h"`` when ``config`` is one of the released sizes, else None."""
    for name, size in XAR_SIZES.items():
        if all(config.get(k) == v for k, v in size.items()):
            return name
    return None


def official_sampling_defaults(model: XAR) -> dict[str, float]:
    """The official README's evaluation settings for the model's size (xAR-B's when it is not a released one)."""
    return dict(XAR_SAMPLING[official_size_name(model.config) or "xar-b"])


def load_official_xar(path_or_sd: str | Path | Mapping[str, torch.Tensor], **overrides: Any) -> XAR:
    """Build an :class:`XAR` from an official ``xAR-{B,L,H}.pth`` (a plain state dict, or a training checkpoint: its
    ``model_ema`` weights when present, else ``model``), on CPU, in eval mode. Raises :class:`UserError` listing
    missing / unexpected / reshaped keys if the file does not match the official layout."""
    if not isinstance(path_or_sd, Mapping) and not Path(path_or_sd).exists():
        raise UserError(f"xAR checkpoint not found: {path_or_sd} (pass the official xAR-B.pth, -L or -H)")
    saved = read_state_dict(path_or_sd, what="xAR checkpoint", wrapper_keys=("model_ema", "model", "state_dict"))
    params = {k: v for k, v in saved.items() if k != OFFICIAL_MASK_KEY and not _is_rope_buffer(k)}
    config = official_xar_config(saved, **overrides)
    with torch.device("meta"):
        model = XAR(**config)
    expected = {k: v for k, v in model.state_dict().items() if not _is_rope_buffer(k)}
    check_state_dict(expected, params, what="the xAR checkpoint",
                     hint="Pass an official xAR-B/L/H.pth (OliverRensu/xAR) or a file in its layout")
    # Parameters are assigned from the file (no random init of a 0.2-1.1B model); buffers are recomputed.
    model.load_state_dict(params, strict=False, assign=True)
    recompute_rope_frequencies(model, saved, family="xAR")
    model.register_layout_buffers(device="cpu")
    return model.eval()
