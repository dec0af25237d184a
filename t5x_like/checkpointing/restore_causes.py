"""Why a checkpoint restore failed, and what every process does about it.

`Checkpointer.restore_latest` (checkpointing/checkpoints.py) sets a checkpoint aside only when it
is proven corrupt; this module says which errors prove that. Each error is one of:

- CORRUPT: the checkpoint's bytes are wrong or missing. Its fingerprints differ
  (CheckpointCorruptError); a file is missing (FileNotFoundError anywhere in the
  chain of causes); its JSON metadata does not parse (json.JSONDecodeError); or
  TensorStore reports a missing or undecodable chunk: a ValueError whose message
  starts with the status `DATA_LOSS`, `OUT_OF_RANGE`, `NOT_FOUND` or
  `FAILED_PRECONDITION` (measured: a truncated array file gives `OUT_OF_RANGE ...
  Requested byte range ... is not valid`, a deleted chunk `FAILED_PRECONDITION ...
  Truncated Zstd-compressed stream`, a truncated OCDBT manifest `DATA_LOSS ... Error
  decoding manifest`; Orbax wraps the first two in a bare Exception, so causes count).
- TRANSIENT: the storage did not answer this time: an OSError with errno EIO,
  EAGAIN, ETIMEDOUT, ECONNRESET, ECONNREFUSED, EBUSY or ENETUNREACH; any
  ConnectionError or TimeoutError; a TensorStore status `UNAVAILABLE`,
  `DEADLINE_EXCEEDED` or `ABORTED`. Retried with exponential backoff.
- FATAL: everything else. Out of memory (MemoryError, XLA `RESOURCE_EXHAUSTED`), a
  readable checkpoint that does not fit the model (CheckpointMismatchError), a bug.
  Retrying or skipping to an older checkpoint would fail the same way or throw away
  good work, so the run stops and nothing is moved.

The causes are checked in that order of precedence: out of memory and mismatch
first (never "corrupt"), then corruption, then transient, and anything unrecognised
is FATAL. With several processes, each computes its outcome and `agree` returns the
worst across all of them, so all take the same branch and reach the same barriers.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import numpy as np

OK, CORRUPT, TRANSIENT, FATAL = 0, 1, 2, 3      # ordered: the worst (largest) wins
NAMES = {OK: "ok", CORRUPT: "corrupt", TRANSIENT: "transient", FATAL: "fatal"}

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.EBUSY, errno.ENETUNREACH}
_CORRUPT_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")
_TRANSIENT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and its causes (raise ... from / during handling), outermost first."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def classify(error: BaseException, *, corrupt_types: tuple = (),
             fatal_types: tuple = ()) -> int:
    """CORRUPT, TRANSIENT or FATAL (see the module docstring). `corrupt_types` and
    `fatal_types` add the caller's own exception classes (checkpointing/checkpoints.py passes
    CheckpointCorruptError and CheckpointMismatchError)."""
    chain = _chain(error)
    if any(isinstance(e, (MemoryError, *fatal_types)) or "RESOURCE_EXHAUSTED" in str(e)
           for e in chain):
        return FATAL
    for e in chain:
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError, *corrupt_types)):
            return CORRUPT
        if isinstance(e, ValueError) and str(e).startswith(_CORRUPT_STATUSES):
            return CORRUPT
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)) or (
                isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS):
            return TRANSIENT
        if str(e).startswith(_TRANSIENT_STATUSES):
            return TRANSIENT
    return FATAL


def agree(outcome: int) -> tuple[int, int]:
    """(the worst outcome over all processes, the first process that had it).

    A collective: every process must call it once per decision. One process: no
    communication."""
    if jax.process_count() == 1:
        return outcome, 0
    from jax.experimental import multihost_utils
    outcomes = np.asarray(multihost_utils.process_allgather(
        np.asarray([outcome], np.int32))).reshape(-1)
    worst = int(outcomes.max())
    return worst, int(np.argmax(outcomes == worst))


# ------------------------------------------------------------------ fault injection
# For tests only: T5X_LIKE_RESTORE_FAULT="<process index>:<memory|eio|corrupt>"
# makes that process's first read of the newest checkpoint fail with that error,
# raised *after* the read, so the multi-process read's collectives have completed
# (as a failure in local post-processing, e.g. verification, would). Read here only.
FAULT_ENV = "T5X_LIKE_RESTORE_FAULT"
_fired: set[str] = set()


def injected_fault(corrupt_error: type) -> BaseException | None:
    """The error the test hook asks this process to raise now (once), else None."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or spec in _fired:
        return None
    process, _, kind = spec.partition(":")
    if int(process) != jax.process_index():
        return None
    _fired.add(spec)
    what = f"injected by {FAULT_ENV}={spec}"
    return {"memory": MemoryError(f"RESOURCE_EXHAUSTED: out of memory ({what})"),
            "eio": OSError(errno.EIO, f"Input/output error ({what})"),
            "corrupt": corrupt_error(f"{what}", fix="it is set aside")}[kind]
