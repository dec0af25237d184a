"""When a process of a multi-process run dies, the others say so in one line and exit.

Left to itself, JAX's coordination service notices a process whose heartbeats stop
and then aborts every other process from C++ (SIGABRT and a stack trace, nothing
about the run). Its Python hook for that moment (the distributed client's
`missed_heartbeat_callback`) cannot be used: the binding fails to pass the status to
a Python function (std::bad_cast, JAX 0.10-0.11). So every process runs this
watchdog, a thread that talks through the coordination service's key-value store:

  * each second it bumps this process's counter under `t5x_like/liveness/<index>`;
  * a peer whose counter has not moved for `timeout_s` has stopped answering (killed,
    hung, its host gone): print `error: process 1 of 2 stopped answering ...`, with
    the last complete checkpoint, and end this process at once (the main thread may
    be blocked in a collective that will never complete: there is nothing to unwind);
  * a process that is leaving writes `exit:<code>` instead (`leave`). A peer that
    left with an error takes the others down with the same kind of line; one that
    finished cleanly is no longer watched;
  * an error from a collective that broke (a peer's socket closed mid-AllGather) is
    often the first sign of a dead peer, seconds before its heartbeats are missed:
    the launcher asks `await_verdict` before reporting it.

JAX's own heartbeat timeout is set to twice `timeout_s` plus a margin (launch/launcher.py),
so the watchdog always speaks first. Process 0 hosts the coordination service, and
the others abort in C++ as soon as it is gone; so process 0, when it leaves with an
error, waits (up to `timeout_s`) until the others have left. What no watchdog can fix:
if process 0 itself is killed, JAX aborts the others within a second.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_PREFIX = "t5x_like/liveness/"
_EXIT = "exit:"
INTERVAL_S = 1.0


class PeerWatchdog:
    """Watches the other processes of this run; see the module docstring."""

    def __init__(self, *, client: Any, process_index: int, process_count: int,
                 timeout_s: float, describe_progress: Callable[[], str] | None = None):
        """`client`: JAX's distributed runtime client (its key-value store).
        `describe_progress()`: what is safe on disk, for the error line (e.g. "the
        last complete checkpoint is step 20 in ...")."""
        self._client = client
        self._index = process_index
        self._count = process_count
        self._timeout_s = timeout_s
        self.describe_progress = describe_progress
        self._beats = 0
        self._leaving = False
        self._dead: set[int] = set()
        now = time.monotonic()
        self._last_seen = {p: (None, now) for p in range(process_count) if p != process_index}
        # How many new counter values each peer has shown: a peer that shows two after
        # a moment was alive after it (a dead one's last beat can land late, once).
        self._beats_seen = dict.fromkeys(self._last_seen, 0)
        self._thread = threading.Thread(target=self._run, name="peer_watchdog", daemon=True)

    def start(self) -> PeerWatchdog:
        self._beat()
        self._thread.start()
        return self

    # ------------------------------------------------------------------ watching

    def _beat(self) -> None:
        self._beats += 1
        self._client.key_value_set(f"{_PREFIX}{self._index}", str(self._beats),
                                   allow_overwrite=True)

    def _peer_values(self) -> dict[int, str]:
        return {int(key.rsplit("/", 1)[-1]): value
                for key, value in self._client.key_value_dir_get(_PREFIX)}

    def _run(self) -> None:
        while True:
            time.sleep(INTERVAL_S)
            if self._leaving:
                return
            try:
                self._beat()
                values = self._peer_values()
            except Exception as e:  # noqa: BLE001 - the service itself is unreachable
                log.debug("liveness check failed: %s", e)
                values = {}
            problem = self._problem(values)
            if problem and not self._leaving:
                self._fail(problem)

    def _problem(self, values: dict[int, str]) -> str | None:
        """The first peer that left with an error or stopped answering, in words."""
        now = time.monotonic()
        for peer, (seen, since) in list(self._last_seen.items()):
            value = values.get(peer)
            if value is not None and value.startswith(_EXIT):
                if value != f"{_EXIT}0":
                    return (f"process {peer} of {self._count} stopped: it exited with "
                            f"status {value[len(_EXIT):]} (its own output says why)")
                del self._last_seen[peer]        # finished cleanly
            elif value != seen:
                self._last_seen[peer] = (value, now)
                if value is not None:      # None: the service did not answer this tick
                    self._beats_seen[peer] += 1
            elif now - since > self._timeout_s:
                self._dead.add(peer)
                return (f"process {peer} of {self._count} stopped answering (no "
                        f"heartbeat for {now - since:.0f} s: killed, hung, or its host is "
                        "gone)")
        return None

    def _fail(self, problem: str) -> None:
        progress = ""
        if self.describe_progress is not None:
            try:
                progress = f"; {self.describe_progress()}"
            except Exception as e:  # noqa: BLE001 - the line must still be printed
                progress = f"; (could not list the checkpoints: {e})"
        sys.stdout.flush()
        print(f"error: {problem}{progress} — restart all processes with the same "
              "command to resume from it", file=sys.stderr, flush=True)
        self.leave(1)
        logging.shutdown()
        os._exit(1)

    def await_verdict(self) -> None:
        """Blocks until the watchdog knows whether a peer died just now.

        For a caller holding an error that a lost peer may have caused (a collective
        that broke: parallel/collective_failures.py). If a peer is gone, the
        watchdog's thread prints its line and ends the process during this wait
        (within the timeout, plus the ticks detection lags behind it). It returns
        as soon as every peer still watched has beaten twice since the call (about
        2 s): they are alive, and the caller's own error is the one to report.
        """
        if self._leaving or not self._thread.is_alive():
            return
        log.info("a collective failed; checking whether another process of the run is "
                 "gone (at most %.0f s)", self._timeout_s + 3 * INTERVAL_S)
        before = dict(self._beats_seen)
        deadline = time.monotonic() + self._timeout_s + 3 * INTERVAL_S
        while time.monotonic() < deadline and self._thread.is_alive():
            if all(self._beats_seen[peer] >= before[peer] + 2
                   for peer in list(self._last_seen)):
                return
            time.sleep(INTERVAL_S / 4)

    # ------------------------------------------------------------------ leaving

    def leave(self, code: int) -> None:
        """Tells the peers this process is leaving with `code`. With an error, process 0
        (host of the coordination service) first waits for the others to leave."""
        self._leaving = True
        try:
            self._client.key_value_set(f"{_PREFIX}{self._index}", f"{_EXIT}{code}",
                                       allow_overwrite=True)
        except Exception:  # noqa: BLE001 - nobody left to tell
            return
        if code == 0 or self._index != 0:
            return
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            try:
                values = self._peer_values()
            except Exception:  # noqa: BLE001
                return
            if all(values.get(p, "").startswith(_EXIT)
                   for p in range(1, self._count) if p not in self._dead):
                return
            time.sleep(INTERVAL_S / 4)
