"""Official LlamaGen GPT checkpoints (``c2i_B_256.pt``, ``c2i_L_384.pt``, ... of FoundationVision/LlamaGen) ->
:class:`vgen.models.raster_ar.RasterAR`.

LlamaGen's DDP checkpoints keep the weights under ``"model"``; its FSDP ones (XXL, 3B) are a raw state dict; its
sampling script also accepts ``"module"`` and ``"state_dict"``. All four are read here. Width, depth, vocabulary,
FFN width and number of classes are read from the tensors; the number of heads is not in the file and comes from
the LlamaGen size with that width and depth (or ``num_heads=``). Neither is the token grid: ``grid_size`` is 16 for
the ``*_256`` files and 24 for the ``*_384`` ones. Keys are compared with :func:`vgen.checkpoints.check_state_dict`,
so a file that does not match raises one :class:`UserError` naming the missing, unexpected and reshaped keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vgen.checkpoints import check_state_dict, read_state_dict
from vgen.errors import UserError
from vgen.models.raster_ar import RASTER_AR_SIZES, RasterAR

#: wrapper keys of LlamaGen's checkpoints, in the order its sampling script tries them
LLAMAGEN_WRAPPER_KEYS = ("model", "module", "state_dict")


def _is_runtime_entry(key: str) -> bool:
    """Entries some LlamaGen files carry that are not weights: a stray ``freqs_cis`` (the RoPE table, a plain attribute
    the official loader ignores with ``strict=False``) and the ``kv_cache`` buffers ``generate()`` adds."""
    return key == "freqs_cis" or key == "causal_mask" or ".kv_cache." in key


def official_llamagen_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None,
                             grid_size: int = 16) -> dict[str, Any]:
    """:class:`RasterAR` constructor kwargs for an official (class-conditional) LlamaGen GPT state dict."""
    if any(k.startswith("cls_embedding.cap_proj") for k in sd):
        raise UserError(
            "this is a text-to-image LlamaGen checkpoint (cls_embedding.cap_proj.*, T5 captions); vgen loads the "
            "class-conditional c2i_* files"
        )
    required = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not an official LlamaGen GPT checkpoint: missing key(s) {', '.join(missing)}")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    if depth == 0:
        raise UserError("not an official LlamaGen GPT checkpoint: no 'layers.N.*' keys")
    vocab_size, embed_dim = sd["tok_embeddings.weight"].shape
    if num_heads is None:
        known = [name for name, size in RASTER_AR_SIZES.items()
                 if (size["depth"], size["embed_dim"]) == (depth, embed_dim)]
        if not known:
            raise UserError(
                f"cannot tell the number of heads of a LlamaGen GPT with {depth} layers of width {embed_dim} (not a "
                "released size); pass num_heads"
            )
        num_heads = RASTER_AR_SIZES[known[0]]["num_heads"]
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    return dict(
        vocab_size=int(vocab_size), grid_size=int(grid_size), depth=depth, embed_dim=int(embed_dim),
        num_heads=int(num_heads), ffn_hidden_dim=int(w1.shape[0]) if w1 is not None else None,
        num_classes=int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1, conditioning="class",
    )


def load_official_llamagen_gpt(path_or_sd: str | Path | Mapping[str, torch.Tensor], num_heads: int | None = None,
                               grid_size: int = 16, **overrides: Any) -> RasterAR:
    """Build a :class:`RasterAR` from an official LlamaGen GPT file (any of its wrappers) on CPU, in eval mode.

    ``overrides`` (e.g. dropout rates for fine-tuning) go to the constructor. Raises :class:`UserError` listing
    missing, unexpected or reshaped keys if the file does not match the official layout."""
    if not isinstance(path_or_sd, Mapping) and not Path(path_or_sd).exists():
        raise UserError(
            f"GPT checkpoint not found: {path_or_sd} (download c2i_B_256.pt or another c2i_* file from the LlamaGen "
            "release and pass its path)"
        )
    sd = read_state_dict(path_or_sd, what="LlamaGen GPT checkpoint", wrapper_keys=LLAMAGEN_WRAPPER_KEYS)
    sd = {k: v for k, v in sd.items() if not _is_runtime_entry(k)}
    config = {**official_llamagen_config(sd, num_heads, grid_size), **overrides}
    with torch.device("meta"):
        model = RasterAR(**config)
    check_state_dict(
        model.state_dict(), sd, what=f"LlamaGen GPT checkpoint ({config['depth']} layers, width {config['embed_dim']})",
        hint="Check that the file is a class-conditional LlamaGen GPT (c2i_*.pt)",
    )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model.register_rope()  # the meta-device tables are recomputed on the CPU
    return model.eval()
