"""Restore decides by cause: only a checkpoint proven corrupt is set aside.

Before, any exception while restoring moved the checkpoint to `checkpoints.corrupt/`:
a transient read error set a good checkpoint aside, an out-of-memory error set aside
every checkpoint in turn and the run restarted at step 0, and with several processes
the ones whose read succeeded waited at a barrier forever.
"""

import errno
import json
import os
import subprocess
import time

import pytest

from launch_helpers import REPO, checkpoint_steps, train_command, train_env
from t5x_like import checkpoint_faults, checkpoints
from t5x_like.checkpoint_faults import Outcome
from test_checkpoint_recovery import assert_trees_equal, one_device, save_steps, source  # noqa: F401 (fixtures)


@pytest.mark.parametrize("error, outcome", [
    (json.JSONDecodeError("Expecting value", "", 0), Outcome.CORRUPT),     # truncated metadata
    (FileNotFoundError("no state metadata for step 3"), Outcome.CORRUPT),
    (ValueError('NOT_FOUND: Error opening "zarr" driver: ... does not exist'), Outcome.CORRUPT),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 2946) is not valid"), Outcome.CORRUPT),
    (checkpoints.CheckpointCorruptError("2 arrays differ", fix="-"), Outcome.CORRUPT),
    (OSError(errno.EIO, "Input/output error"), Outcome.FATAL),      # once retries are spent
    (ValueError("UNAVAILABLE: gcs request failed"), Outcome.FATAL),
    (MemoryError(), Outcome.FATAL),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), Outcome.FATAL),
    (checkpoints.CheckpointMismatchError("mlp changed", fix="-"), Outcome.FATAL),
    (TypeError("a bug"), Outcome.FATAL),
])
def test_each_cause_has_its_decision(error, outcome):
    assert checkpoint_faults.classify(error) == outcome


def test_transient_errors_are_retried_then_the_same_checkpoint_restores(
        tmp_path, source, monkeypatch, caplog):
    state, layout = source
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, state, [1, 2])
    monkeypatch.setenv("T5X_LIKE_RESTORE_FAULT", "0:2:transient:2")       # fails twice
    monkeypatch.setattr(checkpoint_faults, "injected_faults", checkpoint_faults._InjectedFaults())
    ckpt = checkpoints.Checkpointer(directory=directory, retry_delay_s=0.01)
    step, restored, _ = ckpt.restore_latest(abstract_state=layout.abstract_with_shardings())
    ckpt.close()
    assert step == 2
    assert_trees_equal(restored, state)
    assert caplog.text.count("retrying in") == 2
    assert not os.path.exists(f"{directory}.corrupt") and checkpoint_steps(tmp_path) == [1, 2]


@pytest.mark.parametrize("kind, cause", [("oom", "MemoryError: RESOURCE_EXHAUSTED"),
                                         ("transient", "OSError: [Errno 5]")])
def test_out_of_memory_or_storage_that_never_answers_stops_and_moves_nothing(
        tmp_path, source, monkeypatch, kind, cause):
    state, layout = source
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, state, [1, 2])
    monkeypatch.setenv("T5X_LIKE_RESTORE_FAULT", f"0:2:{kind}")
    monkeypatch.setattr(checkpoint_faults, "injected_faults", checkpoint_faults._InjectedFaults())
    ckpt = checkpoints.Checkpointer(directory=directory, restore_attempts=3,
                                    retry_delay_s=0.01)
    with pytest.raises(checkpoint_faults.RestoreError) as raised:
        ckpt.restore_latest(abstract_state=layout.abstract_with_shardings())
    ckpt.close()
    line = raised.value.one_line()
    assert line.startswith(f"cannot restore checkpoint step 2 in {directory} ({cause}"), line
    assert "it is not proven corrupt, so nothing was moved" in line
    assert not os.path.exists(f"{directory}.corrupt") and checkpoint_steps(tmp_path) == [1, 2]


def start_two_processes(model_dir, *extra, env):
    from test_multiprocess import free_port
    port = free_port()
    return [subprocess.Popen(
        train_command(model_dir, *extra, "--num_cpu_devices=4", "--num_processes=2",
                      f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def finish(procs, timeout=300):
    """(return codes, logs); bounded: a process waiting for the other fails the test."""
    started = time.time()
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], logs, time.time() - started


@pytest.mark.slow
def test_two_processes_agree_when_only_one_sees_the_fault(tmp_path):
    """Process 1 alone fails to restore step 2. Out of memory: both stop with one
    `error:` line, nothing moved. Corrupt: both set step 2 aside once and resume
    from step 1, finishing the run."""
    model_dir = str(tmp_path)
    codes, logs, _ = finish(start_two_processes(model_dir, "--gin.TRAIN_STEPS=2",
                                                env=train_env()))
    assert codes == [0, 0], logs[0][-3000:]
    assert checkpoint_steps(model_dir) == [1, 2]

    env = {**train_env(), "T5X_LIKE_RESTORE_FAULT": "1:2:oom"}
    codes, logs, took = finish(start_two_processes(model_dir, "--gin.TRAIN_STEPS=3", env=env))
    assert codes == [1, 1], (logs[0][-2000:], logs[1][-2000:])
    lines = [[l for l in log.splitlines() if l.startswith("error: ")] for log in logs]
    assert len(lines[0]) == 1 and len(lines[1]) == 1, logs
    assert "cannot restore checkpoint step 2" in lines[1][0] and "MemoryError" in lines[1][0]
    assert lines[0][0].startswith("error: another process of this run could not restore "
                                  "checkpoint step 2"), lines[0][0]
    assert checkpoint_steps(model_dir) == [1, 2]
    assert not os.path.exists(os.path.join(model_dir, "checkpoints.corrupt"))

    env = {**train_env(), "T5X_LIKE_RESTORE_FAULT": "1:2:corrupt"}
    codes, logs, _ = finish(start_two_processes(model_dir, "--gin.TRAIN_STEPS=3", env=env))
    assert codes == [0, 0], (logs[0][-2000:], logs[1][-2000:])
    for log in logs:
        assert "Checkpoint step 2 at" in log and "Resumed from checkpoint at step 1" in log
    assert [n.split("-")[0] for n in os.listdir(os.path.join(model_dir,
                                                             "checkpoints.corrupt"))] == ["2"]
    assert checkpoint_steps(model_dir)[-1] == 3
