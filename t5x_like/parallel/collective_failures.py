"""Is this error a collective that broke because another process is gone?

When one process of a multi-process run dies, the others learn it in one of two
ways: the peer watchdog notices its heartbeats stopped (training/peer_watchdog.py),
or, sooner, a collective this process was in fails. With gloo on CPU the second
comes within milliseconds (`UNKNOWN: Gloo AllGather failed: ... Connection reset by
peer`), wrapped in whatever was running it: a train step, or Orbax writing a
checkpoint, which our checkpointing turns into a CheckpointWriteError. Reported as
it stands, that error blames the wrong thing (a checkpoint write, the disk), so the
launcher hands such errors to the watchdog first, which names the lost process if
there is one.

What counts: a `jax.errors.JaxRuntimeError`, anywhere in the exception's chain,
whose status is one the runtimes use for a transport that failed (gloo: UNKNOWN;
NCCL: INTERNAL; the coordination service: UNAVAILABLE, DEADLINE_EXCEEDED...). Out
of memory, a bad program and the like are this process's own and never wait.
"""

from __future__ import annotations

from jax.errors import JaxRuntimeError

# Statuses of runtime errors that a broken connection to another process produces.
_TRANSPORT_STATUSES = ("UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED",
                       "INTERNAL", "CANCELLED", "DATA_LOSS")


def collective_failure_in(error: BaseException | None) -> BaseException | None:
    """The runtime error in `error`'s chain (itself, its causes and the exceptions
    it was raised while handling) that may be a collective broken by a lost peer;
    None if there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _is_transport_failure(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _is_transport_failure(error: BaseException) -> bool:
    if not isinstance(error, JaxRuntimeError):
        return False
    status = str(error).split(":", 1)[0].strip()
    return status in _TRANSPORT_STATUSES
