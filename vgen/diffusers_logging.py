"""Keeping diffusers' log free of two warnings that say nothing new for vgen's models and pipelines.

* diffusers 0.42's ``ModelMixin.to`` warns "There are modules in X that should be kept in float32: []" on every dtype
  cast, because it reads ``self._keep_in_fp32_modules or []`` and then tests the list against None. With an empty
  list there is nothing to keep in float32 (vgen's models keep none: VAR's head computes its logits in float32 by
  itself), so that message is dropped when its list is empty; the warning for a model that names modules still shows.
* Every pipeline load without accelerate warns "Cannot initialize model with low cpu memory usage because
  `accelerate` was not found ..." and then loads the way it would have with ``low_cpu_mem_usage=False``. vgen's own
  loaders pass that setting and so never trigger it; diffusers' generic ``DiffusionPipeline.from_pretrained`` decides
  before it knows the pipeline class, so the advice is dropped there too (the README says what the ``accelerate``
  extra adds: faster, lighter loading of large checkpoints).

:func:`quiet_diffusers_notes` adds one filter per message to the diffusers logger that emits it. Standard-library
logging only: installing them imports neither torch nor diffusers.
"""

from __future__ import annotations

import logging

#: diffusers logger -> the start and a distinctive part of the one message dropped from it
DROPPED = {
    "diffusers.models.modeling_utils": ("There are modules in ", "should be kept in float32: []."),
    "diffusers.pipelines.pipeline_utils": ("Cannot initialize model with low cpu memory usage because `accelerate` "
                                           "was not found", "Defaulting to `low_cpu_mem_usage=False`"),
}


class DropMessage(logging.Filter):
    """Drops records whose message starts with ``start`` and contains ``part``."""

    def __init__(self, start: str, part: str):
        super().__init__()
        self.start, self.part = start, part

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.start) and self.part in message)


def quiet_diffusers_notes() -> None:
    """Install the filters of :data:`DROPPED` (once)."""
    for name, (start, part) in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(DropMessage(start, part))
