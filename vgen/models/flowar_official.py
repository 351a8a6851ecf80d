"""Official FlowAR checkpoints (``FlowAR-{S,L,H}.pth`` of OliverRensu/FlowAR) -> :class:`vgen.models.flowar.FlowAR`.

The released files are plain state dicts that the official ``eval.py`` loads strictly. They carry two kinds of
buffers besides the parameters: ``mask`` (1, 1, 341, 341), the block-causal mask, and ``*.rope.freqs``, the RoPE
frequencies of every attention. Both are recomputed here and dropped from the file (a file whose frequencies are not
the official ones is refused rather than silently re-computed); every parameter is loaded strictly, and keys are
compared with :func:`vgen.checkpoints.check_state_dict`, so a file that does not match raises one
:class:`~vgen.errors.UserError` naming the missing, unexpected and reshaped keys.

The architecture (widths, depths, heads, flow head type and size, number of classes, scales) is read from the
tensors; ``overrides`` (e.g. ``label_drop_prob`` for fine-tuning) go to the constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vgen.checkpoints import check_state_dict, read_state_dict
from vgen.errors import UserError
from vgen.models.flowar import FLOWAR_SAMPLING, FLOWAR_SIZES, FlowAR
from vgen.models.layers import VisionRoPE2D, eva_rope_frequencies

#: the buffer official files carry that vgen recomputes under another name (``attn_mask``)
OFFICIAL_MASK_KEY = "mask"
#: official heads per width when a file has no ``rope.freqs`` to read the head width from
_OFFICIAL_HEADS = {768: 12, 1024: 16, 1536: 16}


def _is_rope_freqs(key: str) -> bool:
    return key.endswith(".rope.freqs")


def stack_depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Blocks of the stack whose keys start with ``prefix`` (e.g. ``"encoder_blocks."``) in a state dict."""
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


def heads_from_rope(sd: Mapping[str, torch.Tensor], freqs_key: str, width: int, default: int | None) -> int:
    """Heads of an attention of ``width`` read from its saved RoPE frequencies (head_dim / 4 of them), else
    ``default``, else a :class:`UserError` line (FlowAR and xAR files carry ``*.rope.freqs``)."""
    if freqs_key in sd:  # head_dim / 4 frequencies
        return width // (4 * sd[freqs_key].numel())
    if default is None:
        raise UserError(f"cannot tell the number of heads: the checkpoint has no {freqs_key} and its width {width} is "
                        "not an official one; pass the number of heads explicitly")
    return default


def scales_for_length(seq_len: int) -> tuple[int, ...]:
    """The doubling schedule (1, 2, 4, ...) with ``seq_len`` tokens (official: 341 -> (1, 2, 4, 8, 16))."""
    scales, total = [], 0
    while total < seq_len:
        scales.append(2 ** len(scales))
        total += scales[-1] ** 2
    if total != seq_len:
        raise UserError(f"cannot infer FlowAR's scales from {seq_len} position-table rows (not 1 + 4 + 16 + ...); "
                        "pass scales explicitly")
    return tuple(scales)


def official_flowar_config(sd: Mapping[str, torch.Tensor], scales: tuple[int, ...] | None = None,
                           **given: Any) -> dict[str, Any]:
    """FlowAR constructor kwargs inferred from an official state dict; ``given`` ones win (e.g. the number of heads
    of a file without ``rope.freqs`` buffers, when its width is not an official one)."""
    required = ("class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "decoder_embed.weight",
                "flownet.input_proj.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not an official FlowAR checkpoint: missing key(s) {', '.join(missing)}")
    De, Dd = sd["class_emb.weight"].shape[1], sd["decoder_embed.weight"].shape[0]
    W = sd["flownet.input_proj.weight"].shape[0]
    encoder_depth, decoder_depth = stack_depth(sd, "encoder_blocks."), stack_depth(sd, "decoder_blocks.")
    flow_depth = stack_depth(sd, "flownet.res_blocks.")
    return dict(
        latent_channels=sd["z_proj.weight"].shape[1],
        patch_size=1,
        scales=tuple(scales) if scales is not None else scales_for_length(sd["encoder_pos_embed_learned"].shape[1]),
        encoder_embed_dim=De,
        encoder_depth=encoder_depth,
        encoder_num_heads=heads_from_rope(sd, "encoder_blocks.0.attn.rope.freqs", De,
                                          given.get("encoder_num_heads", _OFFICIAL_HEADS.get(De))),
        decoder_embed_dim=Dd,
        decoder_depth=decoder_depth,
        decoder_num_heads=heads_from_rope(sd, "decoder_blocks.0.attn.rope.freqs", Dd,
                                          given.get("decoder_num_heads", _OFFICIAL_HEADS.get(Dd))),
        flow_depth=flow_depth,
        flow_width=W,
        flow_num_heads=heads_from_rope(sd, "flownet.res_blocks.0.attn.rope.freqs", W,
                                       given.get("flow_num_heads", W // 64)),
        flow_head="cross_attention" if any(".crossattn." in k for k in sd) else "spatial_adaln",
        rope_reference_side=16.0,  # official: every scale's positions on the 16-grid (pt_seq_len = 16)
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        conditioning="class",
    ) | given


def official_size_name(config: Mapping[str, Any]) -> str | None:
    """``"flowar-s"`` / ``"flowar-l"`` / ``"flowar-h"`` when ``config`` is one of the released sizes, else None."""
    for name, size in FLOWAR_SIZES.items():
        if all(config.get(k) == v for k, v in size.items()):
            return name
    return None


def official_sampling_defaults(model: FlowAR) -> dict[str, float]:
    """The official README's evaluation settings for the model's size (FlowAR-L's when it is not a released one)."""
    return dict(FLOWAR_SAMPLING[official_size_name(model.config) or "flowar-l"])


@torch.no_grad()
def recompute_rope_frequencies(model: torch.nn.Module, saved: Mapping[str, torch.Tensor],
                               family: str = "FlowAR") -> None:
    """Give every RoPE of ``model`` its frequencies (for ``head_dim`` = 4 x their number, theta 10000); refuse a file
    whose own copies differ (it would have been trained with another RoPE). Shared by the FlowAR and xAR loaders."""
    for name, module in model.named_modules():
        if isinstance(module, VisionRoPE2D):
            head_dim = 4 * module.freqs.shape[0]
            freqs = eva_rope_frequencies(head_dim)
            key = f"{name}.freqs"
            if key in saved and (saved[key].shape != freqs.shape or
                                 not torch.allclose(saved[key].float(), freqs, rtol=1e-6, atol=0)):
                raise UserError(f"the {family} checkpoint's {key} is not the official RoPE (theta 10000 over "
                                f"head width {head_dim}); vgen cannot load it")
            module.register_buffer("freqs", freqs)


def load_official_flowar(
    path_or_sd: str | Path | Mapping[str, torch.Tensor],
    scales: tuple[int, ...] | None = None,
    **overrides: Any,
) -> FlowAR:
    """Build a :class:`FlowAR` from an official ``FlowAR-{S,L,H}.pth`` (a plain state dict, or a training
    checkpoint: its ``model_ema`` weights when present, else ``model``), on CPU, in eval mode. Raises
    :class:`UserError` listing missing / unexpected / reshaped keys if the file does not match the official layout."""
    if not isinstance(path_or_sd, Mapping) and not Path(path_or_sd).exists():
        raise UserError(f"FlowAR checkpoint not found: {path_or_sd} (pass the official FlowAR-S.pth, -L or -H)")
    saved = read_state_dict(path_or_sd, what="FlowAR checkpoint", wrapper_keys=("model_ema", "model", "state_dict"))
    params = {k: v for k, v in saved.items() if k != OFFICIAL_MASK_KEY and not _is_rope_freqs(k)}
    config = official_flowar_config(saved, scales, **overrides)
    with torch.device("meta"):
        model = FlowAR(**config)
    expected = {k: v for k, v in model.state_dict().items() if not _is_rope_freqs(k)}
    check_state_dict(expected, params, what="the FlowAR checkpoint",
                     hint="Pass an official FlowAR-S/L/H.pth (OliverRensu/FlowAR) or a file in its layout")
    # Parameters are assigned from the file (no random init of a 0.2-1.9B model); buffers are recomputed.
    model.load_state_dict(params, strict=False, assign=True)
    recompute_rope_frequencies(model, saved)
    model.register_masks(device="cpu")
    return model.eval()
