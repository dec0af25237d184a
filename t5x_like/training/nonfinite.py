"""The non-finite policy: a NaN/Inf loss, gradient or update is never applied.

The jitted step (trainer.py) already refuses a non-finite update and reports a
`nonfinite` flag; this module decides what the run does about it, one step late so
the device never waits: 'halt' stops with an error naming the step and the last
good checkpoint, 'skip_update' goes on, keeping the checkpoint saved before the
first skipped step and stopping after too many in a row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax

from t5x_like import errors
from t5x_like.checkpointing import checkpoints

log = logging.getLogger(__name__)


class NonFiniteError(errors.RunError, FloatingPointError):
    """Training stopped on a NaN/Inf loss, gradient or update."""


class NonFiniteGuard:
    """Reads each step's `nonfinite` flag one step late, so the device never waits.

    The step itself already refused to apply a non-finite update, so the state in
    memory (and any checkpoint) is the last good one. Under 'skip_update', the
    checkpoint saved before the first of a run of skipped steps is protected from
    rotation, and `max_consecutive` skipped steps in a row stop the run.
    """

    def __init__(self, *, policy: str, checkpointer: checkpoints.Checkpointer,
                 max_consecutive: int):
        self._policy = policy
        self._checkpointer = checkpointer
        self._max_consecutive = max_consecutive
        self._pending: tuple[int, Mapping[str, jax.Array]] | None = None
        self._in_a_row: list[int] = []
        self._kept_step: int | None = None     # saved before the first of them
        self.skipped: list[tuple[int, str]] = []    # (step, what was non-finite)

    def observe(self, step: int, step_metrics: Mapping[str, jax.Array]) -> None:
        self.flush()
        self._pending = (step, step_metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, step_metrics = self._pending
        self._pending = None
        if float(step_metrics["nonfinite"]) == 0.0:
            self._in_a_row = []
            return
        what = _nonfinite_quantity(step_metrics)
        self.skipped.append((step, what))
        if self._policy == "halt":
            raise self._halted(step, what)
        if not self._in_a_row:
            self._kept_step = self._checkpointer.latest_step()
            if self._kept_step is not None:
                self._checkpointer.protect(self._kept_step)
        self._in_a_row.append(step)
        log.warning("Step %d: the %s is NaN/Inf; the update was skipped (%d in a row, %d "
                    "so far).", step, what, len(self._in_a_row), len(self.skipped))
        if len(self._in_a_row) >= self._max_consecutive:
            raise self._too_many_in_a_row()

    def _halted(self, step: int, what: str) -> NonFiniteError:
        self._checkpointer.wait_until_finished()
        last = self._checkpointer.latest_step()
        if last is None:
            return NonFiniteError(
                f"The {what} became NaN/Inf at step {step} (the update was not applied); "
                "no checkpoint was written before it",
                fix="lower the learning rate or check the data, then start again (or set "
                "train_loop.train.on_nonfinite_loss='skip_update')")
        return NonFiniteError(
            f"The {what} became NaN/Inf at step {step} (the update was not applied); the "
            f"last good checkpoint is step {last} in {self._checkpointer.directory}",
            fix="lower the learning rate or check the data, then rerun to resume from that "
            "checkpoint (or set train_loop.train.on_nonfinite_loss='skip_update')")

    def _too_many_in_a_row(self) -> NonFiniteError:
        first, last = self._in_a_row[0], self._in_a_row[-1]
        whats = sorted({what for step, what in self.skipped if step >= first})
        kept = (f"step {self._kept_step}, saved before the first of them, is kept in "
                f"{self._checkpointer.directory} (later checkpoints hold the same "
                "parameters)" if self._kept_step is not None
                else "no checkpoint was saved before them")
        return NonFiniteError(
            f"{len(self._in_a_row)} steps in a row ({first}-{last}) had a NaN/Inf "
            f"{' or '.join(whats)} and were skipped; {kept}",
            fix="lower the learning rate or check the data, then rerun (or raise "
            "train_loop.train.max_consecutive_skipped_steps)")

    def log_summary(self) -> None:
        if self._policy == "skip_update" and self.skipped:
            log.warning("Skipped updates (NaN/Inf) at %d step(s): %s", len(self.skipped),
                        _step_ranges(self.skipped))


def _nonfinite_quantity(step_metrics: Mapping[str, jax.Array]) -> str:
    """The first non-finite quantity of the chain loss -> gradient -> update."""
    if not math.isfinite(float(step_metrics["loss"])):
        return "loss"
    if not math.isfinite(float(step_metrics["grad_norm"])):
        return "gradient"
    return "update"


def _step_ranges(skipped: list[tuple[int, str]]) -> str:
    """[(5, 'loss'), (6, 'loss'), (9, 'update')] -> '5-6 (loss), 9 (update)'."""
    groups: list[list] = []
    for step, what in skipped:
        if groups and groups[-1][1] == step - 1 and groups[-1][2] == what:
            groups[-1][1] = step
        else:
            groups.append([step, step, what])
    return ", ".join(f"{a}-{b} ({what})" if a != b else f"{a} ({what})"
                     for a, b, what in groups)
