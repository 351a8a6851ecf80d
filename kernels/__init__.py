"""vgen.kernels: Triton kernels for compressed KV caches, each with a plain-PyTorch reference and a dispatcher.

* :func:`segment_attention`: attention over a K/V pool whose per-head key sequence is a segment table;
* :func:`compact_kv`: gather K and V rows by per-head (or per head-group) index lists, one launch;
* :func:`segment_scores`: per-segment key cosine similarity between consecutive frames (Forcing-KV).

Every function takes ``backend="auto" | "triton" | "reference"`` (see :mod:`vgen.kernels._dispatch`). Importing
this package does not need triton.
"""

from vgen.kernels._dispatch import BACKENDS, interpreter_enabled, resolve_backend, triton_available
from vgen.kernels.attention import segment_attention, segment_attention_reference, segment_rows
from vgen.kernels.compaction import compact_kv, compact_kv_reference, pad_index_lists
from vgen.kernels.scoring import segment_scores, segment_scores_reference

__all__ = [
    "BACKENDS",
    "compact_kv",
    "compact_kv_reference",
    "interpreter_enabled",
    "pad_index_lists",
    "resolve_backend",
    "segment_attention",
    "segment_attention_reference",
    "segment_rows",
    "segment_scores",
    "segment_scores_reference",
    "triton_available",
]
