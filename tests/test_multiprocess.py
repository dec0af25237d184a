"""Real multi-controller JAX: 2 processes x 4 CPU devices over gloo on loopback,
the way Cloud TPU VM pods and GPU clusters run, against 1 process x 8 devices."""

import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from launch_helpers import REPO, checkpoint_steps, logged_losses, run_train, train_command, \
    train_env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(model_dir, *extra):
    port = free_port()
    return [subprocess.Popen(
        train_command(model_dir, *extra, "--num_cpu_devices=4", "--num_processes=2",
                      f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"),
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]


def run_two_processes(model_dir, *extra):
    procs = start_two_processes(model_dir, *extra)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


@pytest.fixture(scope="module")
def one_process_8_devices(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("one_process"))
    run_train(model_dir, "--gin.TRAIN_STEPS=4", "--num_cpu_devices=8")
    return logged_losses(model_dir)


@pytest.mark.slow      # the default suite's longest test (343 s, shared machine)
def test_two_processes_match_one_and_their_checkpoints_restore_in_one(
        tmp_path, one_process_8_devices):
    model_dir = str(tmp_path)
    logs = run_two_processes(model_dir, "--gin.TRAIN_STEPS=2")
    assert "processes: 2" in logs[0] and "Devices: 8" in logs[0]
    losses = logged_losses(model_dir)          # written by process 0 only
    assert sorted(losses) == [1, 2]
    np.testing.assert_allclose([losses[1], losses[2]],
                               [one_process_8_devices[1], one_process_8_devices[2]], rtol=1e-6)

    # The 2-process checkpoint restores in a single process and continues identically.
    log = run_train(model_dir, "--gin.TRAIN_STEPS=4", "--num_cpu_devices=8")
    assert "Resumed from checkpoint at step 2" in log
    # Both shards (one saved by each process) continue from their saved positions.
    assert "Data shards [0, 1] continue from their saved positions" in log
    assert "replaying" not in log
    losses = logged_losses(model_dir)
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)],
                               [one_process_8_devices[s] for s in (1, 2, 3, 4)], rtol=1e-6)


@pytest.mark.slow
def test_one_process_checkpoint_restores_in_two(tmp_path, one_process_8_devices):
    model_dir = str(tmp_path)
    run_train(model_dir, "--gin.TRAIN_STEPS=2", "--num_cpu_devices=8")
    logs = run_two_processes(model_dir, "--gin.TRAIN_STEPS=4")
    assert all("Resumed from checkpoint at step 2" in log for log in logs)
    for shard, log in enumerate(logs):
        assert f"Data shards [{shard}] continue from their saved positions" in log
        assert "replaying" not in log
    losses = logged_losses(model_dir)
    np.testing.assert_allclose([losses[3], losses[4]],
                               [one_process_8_devices[3], one_process_8_devices[4]], rtol=1e-6)


@pytest.mark.slow
def test_when_one_process_dies_the_other_exits_with_one_line_naming_it(tmp_path):
    """Left to JAX, the survivor aborted from C++ (SIGABRT, a stack trace) ~70 s later.
    The peer watchdog ends it within the heartbeat timeout, exit 1, with one line
    naming the lost process and the last complete checkpoint."""
    model_dir = str(tmp_path)
    timeout_s = 10
    procs = start_two_processes(model_dir, "--gin.TRAIN_STEPS=100000",
                                f"--heartbeat_timeout_seconds={timeout_s}")
    deadline = time.time() + 300
    while 1 not in checkpoint_steps_or_empty(model_dir):
        assert time.time() < deadline and procs[0].poll() is None, "no checkpoint 1"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=120)          # bounded: never hangs
    took = time.time() - killed_at
    procs[1].wait()
    assert procs[0].returncode == 1, out[-3000:]         # not -6 (SIGABRT)
    assert took < timeout_s + 15, took                   # the timeout, plus the exit
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    steps = checkpoint_steps(model_dir)
    assert steps and steps[0] >= 1                       # what was saved is intact
    line = errors[0]
    assert line.startswith("error: process 1 of 2 stopped answering"), line
    match = re.search(r"the last complete checkpoint is step (\d+) in ", line)
    assert match and int(match.group(1)) in steps, line
    assert "restart all processes with the same command to resume" in line
    for noise in ("Fatal Python error", "stack trace", "*** SIGABRT", "F0000", "Check failed"):
        assert noise not in out, (noise, out[-3000:])


def checkpoint_steps_or_empty(model_dir):
    return checkpoint_steps(model_dir) if os.path.isdir(
        os.path.join(model_dir, "checkpoints")) else []


TP8 = ("--gin.partitioning.Partitioner.data_parallelism=1",
       "--gin.partitioning.Partitioner.tensor_parallelism=8")


@pytest.mark.slow
def test_model_axis_across_processes_trains_like_one_process(tmp_path):
    """tensor_parallelism=8 over 2 hosts x 4: every device holds the whole batch, so
    both processes must feed the same rows (partitioning.batch_block), not half each.
    Before, each fed its own half and the global batch doubled. Losses equal those
    of 1 process x 8 devices with the same mesh."""
    one = str(tmp_path / "one")
    run_train(one, *TP8, "--num_cpu_devices=8")
    logs = run_two_processes(str(tmp_path / "two"), *TP8)
    assert "model=8" in logs[0], logs[0][-2000:]
    two = logged_losses(str(tmp_path / "two"))
    assert sorted(two) == [1, 2]
    np.testing.assert_allclose([two[s] for s in (1, 2)],
                               [logged_losses(one)[s] for s in (1, 2)], rtol=1e-6)
