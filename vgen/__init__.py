"""vgen: visual autoregressive generation.

Layers (see README): ``vgen.tokenizers`` (images <-> tokens), ``vgen.samplers`` (logits processing, CFG, seeding,
generation loops), ``vgen.kernels`` (Triton kernels with PyTorch references), ``vgen.eval`` (FID, GenEval,
benchmarks), and this package: generators (``vgen.models``), pipelines, KV caches, data worlds, CLI and config.
"""

__version__ = "0.1.0"

from vgen.diffusers_logging import drop_empty_fp32_warning  # noqa: E402
from vgen.errors import UserError  # noqa: E402

# vgen's models keep no module in float32; diffusers would say so on every .to(dtype) (see vgen.diffusers_logging)
drop_empty_fp32_warning()

__all__ = ["UserError", "__version__"]
