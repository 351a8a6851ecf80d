"""Keeping diffusers' log free of a warning that says nothing for vgen's models.

diffusers 0.42's ``ModelMixin.to`` warns "There are modules in X that should be kept in float32: []" on every dtype
cast, because it reads ``self._keep_in_fp32_modules or []`` and then tests the list against None. With an empty
list there is nothing to keep in float32 (vgen's models keep none: VAR's head computes its logits in float32 by
itself), so :func:`drop_empty_fp32_warning` adds a filter to diffusers' ``modeling_utils`` logger that drops exactly
that message when its list is empty; the warning for a model that does name modules still shows. Standard-library
logging only: installing it imports neither torch nor diffusers.
"""

from __future__ import annotations

import logging

#: the diffusers logger that emits the warning
MODELING_LOGGER = "diffusers.models.modeling_utils"


class EmptyFp32ListFilter(logging.Filter):
    """Drops "There are modules in X that should be kept in float32: []." records (an empty list only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in ") and "should be kept in float32: []." in message)


def drop_empty_fp32_warning() -> None:
    """Install :class:`EmptyFp32ListFilter` on diffusers' ``modeling_utils`` logger (once)."""
    logger = logging.getLogger(MODELING_LOGGER)
    if not any(isinstance(f, EmptyFp32ListFilter) for f in logger.filters):
        logger.addFilter(EmptyFp32ListFilter())
