"""Noticing a preemption (SIGTERM) and agreeing on the step at which to stop.

Cloud TPU VMs, GKE and SLURM send SIGTERM some seconds before taking a machine.
The train loop asks `should_stop(step)` at every step boundary; once it says yes,
the loop saves a checkpoint at that step, waits for the write and exits.

With one process a Python signal handler sets a flag. With several, every process
must stop at the *same* step (a checkpoint is a collective write), so JAX's
coordination service decides: `reached_preemption_sync_point` returns True on all
processes at the same step after any of them got the signal.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionWatcher:
    def __init__(self):
        self._signalled = False
        self._previous_handler = None
        if jax.process_count() == 1:
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:   # not the main thread (e.g. an embedding app): no handler
                log.warning("Not on the main thread: SIGTERM will not trigger a clean save.")

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: will save a checkpoint and stop at the next step.")
        self._signalled = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._signalled

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
