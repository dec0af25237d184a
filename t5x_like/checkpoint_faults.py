"""What a failed restore means, and one decision for every process.

Setting a checkpoint aside is only right when it is proven corrupt; anything else
must leave it where it is. So each error of a restore is put in one of three kinds:

- CORRUPT: the checkpoint's bytes are wrong or missing. Fingerprint mismatch
  (integrity.py), a missing file (FileNotFoundError, TensorStore's NOT_FOUND), a
  truncated one (OUT_OF_RANGE, DATA_LOSS, or metadata that no longer parses as
  JSON). The checkpoint is moved to `<dir>.corrupt/` and the previous one is tried.
- TRANSIENT: the storage did not answer this time (connection reset or refused,
  time-outs, EIO/EAGAIN, TensorStore's UNAVAILABLE / DEADLINE_EXCEEDED / ABORTED,
  HTTP 429/503). Retried with exponential backoff; if it never succeeds, the run
  stops (FATAL below) and moves nothing: a slow bucket is no reason to lose work.
- FATAL: everything else: out of memory (MemoryError, XLA's RESOURCE_EXHAUSTED), a
  checkpoint of another config (CheckpointMismatchError), a bug. The run stops with
  one `error:` line naming the step and the cause; nothing is moved.

With several processes each one classifies its own outcome, then all take the worst
(OK < CORRUPT < FATAL) through one small all-gather, so they quarantine together or
stop together, and none waits at a barrier another never reaches.

`T5X_LIKE_RESTORE_FAULT=<process>:<step>:<kind>[:<times>]` (kinds: transient, oom,
corrupt) makes that process's restore of that step fail after its read, `times`
times (default: always). It exists for the fault tests (tests/test_restore_faults.py),
which need one process of a real multi-process run to see a fault the others do not.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from t5x_like import errors

log = logging.getLogger(__name__)

T = TypeVar("T")


class CheckpointMismatchError(errors.RunError, ValueError):
    """A checkpoint is readable but its tree does not match what is being restored."""


class CheckpointCorruptError(errors.RunError, ValueError):
    """A checkpoint was read, but its arrays are not what was saved."""


class RestoreError(errors.RunError, RuntimeError):
    """A checkpoint could not be restored for a reason that is not its corruption."""


class Outcome(enum.IntEnum):
    """Ordered by severity: processes agree on the largest."""
    OK = 0
    CORRUPT = 1
    FATAL = 2


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EBUSY,
                     errno.ENETUNREACH, errno.EHOSTUNREACH}
_TRANSIENT_MARKS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED:", "Connection reset",
                    "Connection refused", "timed out", "429 Too Many", "503 Service")
_CORRUPT_MARKS = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "does not exist",
                  "Error decoding", "Failed to decode", "Unexpected end", "truncated")
_FATAL_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def is_transient(error: BaseException) -> bool:
    if isinstance(error, FileNotFoundError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    message = str(error)
    return any(mark in message for mark in _TRANSIENT_MARKS) and not any(
        mark in message for mark in _FATAL_MARKS)


def classify(error: BaseException) -> Outcome:
    """CORRUPT or FATAL for an error that retrying did not cure (see the top)."""
    if isinstance(error, CheckpointCorruptError):
        return Outcome.CORRUPT
    if isinstance(error, (MemoryError, CheckpointMismatchError, RestoreError)):
        return Outcome.FATAL
    message = str(error)
    if any(mark in message for mark in _FATAL_MARKS) or is_transient(error):
        return Outcome.FATAL
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
        return Outcome.CORRUPT
    if isinstance(error, (ValueError, OSError)) and any(m in message for m in _CORRUPT_MARKS):
        return Outcome.CORRUPT
    return Outcome.FATAL


def with_retries(read: Callable[[], T], *, what: str, attempts: int, first_delay_s: float
                 ) -> T:
    """`read()`, retried on transient errors with delays first_delay_s, x2, x4, ...;
    the last error is raised when `attempts` are used up, any other at once."""
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - sorted right below
            if attempt == attempts or not is_transient(e):
                raise
            delay = first_delay_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s: %s); retrying in %.1f s (attempt %d of %d).", what,
                        type(e).__name__, str(e)[:200], delay, attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def agree(outcome: Outcome) -> Outcome:
    """The worst outcome over all processes (this one's alone when it is the only)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.asarray([int(outcome)], np.int32))
    return Outcome(int(np.max(every)))


class _InjectedFaults:
    """The T5X_LIKE_RESTORE_FAULT hook (see the top); inert when the variable is unset."""

    def __init__(self):
        spec = os.environ.get("T5X_LIKE_RESTORE_FAULT", "")
        parts = spec.split(":") if spec else []
        self._process = int(parts[0]) if parts else None
        self._step = int(parts[1]) if parts else None
        self._kind = parts[2] if parts else None
        self._left = int(parts[3]) if len(parts) > 3 else None

    def check(self, step: int) -> None:
        if self._kind is None or (self._process, self._step) != (jax.process_index(), step):
            return
        if self._left is not None:
            if self._left <= 0:
                return
            self._left -= 1
        if self._kind == "transient":
            raise OSError(errno.EIO, f"injected transient read error at step {step}")
        if self._kind == "oom":
            raise MemoryError(f"RESOURCE_EXHAUSTED: injected out of memory at step {step}")
        if self._kind == "corrupt":
            raise CheckpointCorruptError(
                f"checkpoint step {step}: injected corruption",
                fix="it is set aside; resume from an earlier checkpoint")
        raise ValueError(f"T5X_LIKE_RESTORE_FAULT kind {self._kind!r}: choose transient, "
                         "oom or corrupt")


injected_faults = _InjectedFaults()
