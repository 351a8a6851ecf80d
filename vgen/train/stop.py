"""Stopping a training run on Ctrl-C (SIGINT) or SIGTERM without losing the steps since the last checkpoint.

The first signal only sets :attr:`StopRequest.requested`: the loop finishes the step it is in, saves a checkpoint and
raises :class:`TrainingInterrupted`. The handlers are then back to what they were, so a second Ctrl-C stops at once
(a ``KeyboardInterrupt``, which the CLI turns into one line). Data-loader workers ignore SIGINT
(:func:`ignore_interrupts`): a terminal sends Ctrl-C to every process of the run, and the main process decides.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on request after saving a checkpoint; the message says how to continue."""


class StopRequest:
    """Context manager: while active, the first SIGINT / SIGTERM sets :attr:`requested` (and calls ``say``)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.requested = True
        self._restore()
        self.say(
            f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint, then stopping "
            "(press Ctrl-C again to stop at once, without saving)"
        )


def ignore_interrupts(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: the worker leaves Ctrl-C to the training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
