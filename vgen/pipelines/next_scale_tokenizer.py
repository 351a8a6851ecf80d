"""Does a tokenizer fit a next-scale transformer? Checked once, where the two meet (a pipeline is built or loaded,
``vgen convert``), so a mismatch is one line instead of an index or shape error deep inside the first generation.

The transformer predicts ids into the tokenizer's codebook (``vocab_size``), embeds the tokenizer's ``Cvae``-dim
features and runs its ``patch_nums`` schedule; the tokenizer's residual quantizer must agree on all three. Any
tokenizer whose ``quantize`` implements :class:`~vgen.samplers.interfaces.ResidualQuantizer` and which decodes with
``fhat_to_img`` fits: VAR's :class:`~vgen.tokenizers.msvq.MultiScaleVQModel` and NFIG's frequency-band
:class:`~vgen.tokenizers.frvae.FrequencyVQModel`.
"""

from __future__ import annotations

from vgen.errors import UserError
from vgen.samplers.interfaces import ResidualQuantizer

NEXT_SCALE_TOKENIZERS = "MultiScaleVQModel (VAR) or FrequencyVQModel (NFIG)"


def check_tokenizer_fits(vqvae, transformer) -> None:
    """Raise a one-line :class:`UserError` unless ``vqvae`` is a next-scale tokenizer with the codebook size, code
    dimension and scale schedule of ``transformer`` (a :class:`~vgen.models.var.VAR`)."""
    kind = type(vqvae).__name__
    quantizer = getattr(vqvae, "quantize", None)
    if not isinstance(quantizer, ResidualQuantizer) or not callable(getattr(vqvae, "fhat_to_img", None)):
        raise UserError(
            f"the tokenizer is a {kind}, which has no residual quantizer for next-scale generation; give a "
            f"{NEXT_SCALE_TOKENIZERS}"
        )
    vocab_size, Cvae = quantizer.embedding.weight.shape
    config = transformer.config
    tokenizer_patch_nums = [int(pn) for pn in getattr(vqvae, "patch_nums", ())]
    transformer_patch_nums = [int(pn) for pn in config.patch_nums]
    problems = []
    if vocab_size != config.vocab_size:
        problems.append(f"codebook size {vocab_size} vs {config.vocab_size}")
    if Cvae != config.Cvae:
        problems.append(f"code dimension {Cvae} vs {config.Cvae}")
    if tokenizer_patch_nums != transformer_patch_nums:
        problems.append(f"patch_nums {tokenizer_patch_nums} vs {transformer_patch_nums}")
    if problems:
        raise UserError(
            f"the tokenizer ({kind}) does not fit the transformer ({'; '.join(problems)}, tokenizer vs "
            "transformer); use the tokenizer the transformer was trained with"
        )
