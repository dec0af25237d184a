"""A collective that breaks because another process died is reported as that death.

CI (stop 34) killed one of two training processes while the other was inside an
Orbax save; gloo failed the save's AllGather at once ("Connection reset by peer"),
and the survivor's one line said the checkpoint write failed — free disk space or
fix permissions — ten seconds before its watchdog would have named the dead peer.
Here the same happens on purpose (tests/collective_breaks_program.py), every time.
"""

import re
import socket
import subprocess
import sys
import time

import pytest
from jax.errors import JaxRuntimeError

from launch_helpers import REPO, train_env
from t5x_like.checkpointing import checkpoints
from t5x_like.parallel import collective_failures

TIMEOUT_S = 3          # the peers' heartbeat timeout: the wait is bounded by it


def run_two_processes(directory, *extra, timeout_s=TIMEOUT_S):
    """(output of process 0, output of process 1, seconds process 0 took after
    checkpoint 1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "tests/collective_breaks_program.py", f"--directory={directory}",
         "--num_cpu_devices=2", "--num_processes=2", f"--process_id={i}",
         f"--coordinator_address=127.0.0.1:{port}",
         f"--heartbeat_timeout_seconds={timeout_s}", *extra],
        cwd=REPO, env={**train_env(), "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    lines = []
    for line in procs[0].stdout:                   # until checkpoint 1 is complete
        lines.append(line)
        if line.startswith("checkpoint 1 saved"):
            break
    saved_at = time.time()
    out0 = "".join(lines) + procs[0].communicate(timeout=120)[0]
    took = time.time() - saved_at
    out1 = procs[1].communicate(timeout=120)[0]
    return procs, out0, out1, took


def error_lines(out):
    return [line for line in out.splitlines() if line.startswith("error: ")]


def test_a_collective_broken_by_a_dead_peer_is_reported_as_the_dead_peer(tmp_path):
    procs, out0, _, took = run_two_processes(str(tmp_path), "--peer_dies")
    assert procs[0].returncode == 1, out0[-3000:]
    assert procs[1].returncode == -9
    errors = error_lines(out0)
    assert len(errors) == 1, out0[-3000:]
    assert errors[0].startswith("error: process 1 of 2 stopped answering"), errors[0]
    assert re.search(r"the last complete checkpoint is step 1 in ", errors[0]), errors[0]
    assert "Traceback" not in out0, out0[-3000:]
    assert took < 1.0 + TIMEOUT_S + 10, took       # the timeout, the lag, the exit


def test_with_every_peer_answering_the_writes_own_error_is_reported_at_once(tmp_path):
    """The watchdog is asked, and answers as soon as the peer has beaten twice (~2
    s), not after the whole heartbeat timeout (30 s here)."""
    procs, out0, out1, took = run_two_processes(str(tmp_path), timeout_s=30)
    assert procs[0].returncode == 1, out0[-3000:]
    errors = error_lines(out0)
    assert len(errors) == 1, out0[-3000:]
    assert errors[0].startswith("error: Writing the checkpoint for step 2 to "), errors[0]
    assert "Gloo AllGather failed" in errors[0]
    assert "the last complete checkpoint is step 1, intact" in errors[0]
    assert ("check that every process of the run is running and can reach the others"
            in errors[0]), errors[0]
    assert "checking whether another process of the run is gone" in out0, out0[-3000:]
    assert took < 15, took                         # 1 s before the write, ~2 s asking
    # Process 0 left with an error, so process 1's watchdog ends it with one line.
    assert procs[1].returncode == 1, out1[-3000:]
    assert error_lines(out1)[0].startswith(
        "error: process 0 of 2 stopped: it exited with status 1"), out1[-3000:]


@pytest.mark.parametrize("message, expected", [
    ("UNKNOWN: Gloo AllGather failed: Connection reset by peer", True),
    ("INTERNAL: NCCL operation ncclAllReduce failed: unhandled system error", True),
    ("UNAVAILABLE: failed to connect to all addresses", True),
    ("DEADLINE_EXCEEDED: Barrier timed out", True),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB", False),
    ("INVALID_ARGUMENT: Executable expected parameter 0 of size 8", False),
])
def test_which_runtime_errors_may_be_a_lost_peer(message, expected):
    error = JaxRuntimeError(message)
    assert (collective_failures.collective_failure_in(error) is error) is expected
    # Wrapped twice, as the checkpoint write and the launcher's exit wrap it.
    try:
        try:
            raise checkpoints.CheckpointWriteError("write failed", fix="...") from error
        except checkpoints.CheckpointWriteError:
            raise SystemExit("error: write failed")
    except SystemExit as wrapped:
        assert (collective_failures.collective_failure_in(wrapped) is error) is expected
    assert collective_failures.collective_failure_in(OSError("No space left")) is None
    assert collective_failures.collective_failure_in(RuntimeError(message)) is None
