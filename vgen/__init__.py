"""vgen: visual autoregressive generation.

Layers (see README): ``vgen.tokenizers`` (images <-> tokens), ``vgen.samplers`` (logits processing, CFG, seeding,
generation loops), ``vgen.kernels`` (Triton kernels with PyTorch references), ``vgen.eval`` (FID, GenEval,
benchmarks), and this package: generators (``vgen.models``), pipelines, KV caches, data worlds, CLI and config.
"""

__version__ = "0.1.0"

from vgen.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
