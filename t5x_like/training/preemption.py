"""Noticing a preemption (SIGTERM) and agreeing on the step at which to stop.

Cloud TPU VMs, GKE and SLURM send SIGTERM some seconds before taking a machine.
The train loop asks `should_stop(step)` at every step boundary (and once before the
first step); once it says yes, the loop saves a checkpoint at that step (nothing to
save before the first), waits for the write and exits.

With one process a Python signal handler sets a flag. The launcher installs it first
thing (`notice_sigterm`, before JAX or TensorFlow are even imported), so a SIGTERM
during start-up (imports, compilation, restore) ends the run cleanly too instead of
killing it. With several processes, every process must stop at the *same* step (a
checkpoint is a collective write), so JAX's coordination service decides:
`reached_preemption_sync_point` returns True on all processes at the same step after
any of them got the signal (JAX's own handler receives it from then on).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class _Sigterm:
    """The process-wide handler's state (a signal belongs to the whole process)."""
    installed = False
    received = False


def _on_sigterm(signum, frame) -> None:
    del signum, frame
    log.warning("SIGTERM received: will save a checkpoint and stop at the next step.")
    _Sigterm.received = True


def notice_sigterm() -> None:
    """From now on SIGTERM only asks the run to stop at the next step boundary.

    Imports nothing heavy, so an entry point can call it on its first line.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    _Sigterm.installed = True


class PreemptionWatcher:
    def __init__(self):
        import jax
        self._multi_process = jax.process_count() > 1
        self._previous_handler = None
        if self._multi_process:
            if _Sigterm.received:      # before JAX's handler existed: hand it over
                os.kill(os.getpid(), signal.SIGTERM)
        elif not _Sigterm.installed:   # train() called from Python: a handler for the run
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            except ValueError:   # not the main thread (e.g. an embedding app): no handler
                log.warning("Not on the main thread: SIGTERM will not trigger a clean save.")

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return _Sigterm.received

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
            _Sigterm.received = False
