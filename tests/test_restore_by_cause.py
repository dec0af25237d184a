"""Restore decides by cause: only a corrupt checkpoint is set aside; a transient read
error is retried; anything else stops every process with one error and moves nothing."""

import errno
import glob
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch_helpers import REPO, checkpoint_steps, run_train, train_command, train_env
from t5x_like import errors
from t5x_like.checkpointing import checkpoints
from t5x_like.checkpointing import restore_causes
from test_multiprocess import free_port

STATE = {"w": jnp.arange(300_000, dtype=jnp.float32), "b": jnp.ones((8,))}   # 1.2 MB


def abstract():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        STATE)


@pytest.fixture
def three_steps(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpoints.Checkpointer(directory=directory)
    for step in (1, 2, 3):
        ckpt.save(step, jax.tree.map(lambda x: x + step, STATE), data_position={"step": step})
    ckpt.close()
    return directory


def fail_reads_of(monkeypatch, step, error, times):
    """Our own Checkpointer.restore raises `error` on the first `times` reads of
    `step` (after reading, as a failing storage read would surface)."""
    original = checkpoints.Checkpointer.restore
    calls = []

    def restore(self, s, **kwargs):
        result = original(self, s, **kwargs)
        if s == step:
            calls.append(s)
            if len(calls) <= times:
                raise error
        return result

    monkeypatch.setattr(checkpoints.Checkpointer, "restore", restore)
    return calls


def test_transient_read_error_is_retried_and_nothing_is_set_aside(three_steps, monkeypatch):
    calls = fail_reads_of(monkeypatch, 3, OSError(errno.EIO, "Input/output error"), times=2)
    ckpt = checkpoints.Checkpointer(directory=three_steps, restore_backoff_s=0.01)
    step, state, data = ckpt.restore_latest(abstract_state=abstract())
    assert (step, data, len(calls)) == (3, {"step": 3}, 3)
    np.testing.assert_array_equal(state["w"], np.asarray(STATE["w"]) + 3)
    assert ckpt.all_steps() == [1, 2, 3]
    assert not os.path.exists(f"{three_steps}.corrupt")
    ckpt.close()


def test_persistent_transient_error_stops_after_the_attempts_and_moves_nothing(
        three_steps, monkeypatch):
    calls = fail_reads_of(monkeypatch, 3, TimeoutError("read timed out"), times=99)
    ckpt = checkpoints.Checkpointer(directory=three_steps, restore_attempts=3,
                                    restore_backoff_s=0.01)
    with pytest.raises(checkpoints.CheckpointRestoreError,
                       match=r"step 3 .* after 3 attempts .*TimeoutError"):
        ckpt.restore_latest(abstract_state=abstract())
    assert len(calls) == 3 and ckpt.all_steps() == [1, 2, 3]
    assert not os.path.exists(f"{three_steps}.corrupt")
    ckpt.close()


@pytest.mark.parametrize("error", [
    MemoryError("out of memory"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")])
def test_out_of_memory_is_one_error_naming_step_and_cause_and_moves_nothing(
        three_steps, monkeypatch, error):
    calls = fail_reads_of(monkeypatch, 3, error, times=99)
    ckpt = checkpoints.Checkpointer(directory=three_steps, restore_backoff_s=0.01)
    with pytest.raises(checkpoints.CheckpointRestoreError) as raised:
        ckpt.restore_latest(abstract_state=abstract())
    assert isinstance(raised.value, errors.RunError)
    line = raised.value.one_line()
    assert "checkpoint step 3" in line and type(error).__name__ in line, line
    assert "nothing was moved" in line and "free memory" in line, line
    assert len(calls) == 1                                   # not retried
    assert ckpt.all_steps() == [1, 2, 3]
    assert not os.path.exists(f"{three_steps}.corrupt")
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_array_file_is_set_aside_and_previous_restored(
        three_steps, damage):
    files = [f for f in glob.glob(f"{three_steps}/3/state/**/*", recursive=True)
             if os.path.isfile(f) and os.path.getsize(f) > 100_000]
    assert files
    for f in files:
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(100)
        else:
            os.remove(f)
    ckpt = checkpoints.Checkpointer(directory=three_steps)
    step, state, _ = ckpt.restore_latest(abstract_state=abstract())
    assert step == 2
    np.testing.assert_array_equal(state["w"], np.asarray(STATE["w"]) + 2)
    assert ckpt.all_steps() == [1, 2]
    assert os.listdir(f"{three_steps}.corrupt")[0].startswith("3-")
    ckpt.close()


@pytest.mark.parametrize("error,outcome", [
    (OSError(errno.EIO, "Input/output error"), restore_causes.TRANSIENT),
    (ConnectionResetError("reset"), restore_causes.TRANSIENT),
    (ValueError("UNAVAILABLE: gcs backend unavailable"), restore_causes.TRANSIENT),
    (ValueError("DEADLINE_EXCEEDED: read"), restore_causes.TRANSIENT),
    (FileNotFoundError("no state metadata"), restore_causes.CORRUPT),
    (ValueError("DATA_LOSS: Error decoding manifest"), restore_causes.CORRUPT),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 8) is not valid"),
     restore_causes.CORRUPT),
    (MemoryError(), restore_causes.FATAL),
    (ValueError("RESOURCE_EXHAUSTED: OOM"), restore_causes.FATAL),
    (PermissionError(errno.EACCES, "denied"), restore_causes.FATAL),
    (KeyError("bug"), restore_causes.FATAL),
])
def test_classification(error, outcome):
    assert restore_causes.classify(error) == outcome


def test_orbax_wrapped_tensorstore_error_is_classified_by_its_cause():
    try:
        try:
            raise ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream")
        except ValueError as e:
            raise Exception("Encountered error while reading array index") from e
    except Exception as wrapped:                                        # noqa: BLE001
        assert restore_causes.classify(wrapped) == restore_causes.CORRUPT


# ------------------------------------------------------------------ two processes

def start_two(model_dir, fault, *extra):
    port = free_port()
    return [subprocess.Popen(
        train_command(model_dir, *extra, "--num_cpu_devices=4", "--num_processes=2",
                      f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"),
        cwd=REPO, env={**train_env(), restore_causes.FAULT_ENV: fault},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow     # ~3 min on 2 shared cores: three runs of launch.train
def test_two_processes_agree_when_only_one_sees_the_fault(tmp_path):
    """Process 1 alone fails reading the newest step. Out of memory: both stop with
    one `error:` line and nothing moves (the old code moved it on process 1 only
    and process 0 waited at the barrier). Corruption: both set it aside once and
    resume from the previous step."""
    model_dir = str(tmp_path)
    run_train(model_dir, "--gin.TRAIN_STEPS=2", "--num_cpu_devices=8")
    assert checkpoint_steps(model_dir) == [1, 2]

    start = time.time()
    procs = start_two(model_dir, "1:memory", "--gin.TRAIN_STEPS=3")
    logs = finish(procs)
    took_memory = time.time() - start
    for p, log in zip(procs, logs):
        assert p.returncode == 1, log[-3000:]
        lines = [line for line in log.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, log[-3000:]
        assert "checkpoint step 2" in lines[0] and "nothing was moved" in lines[0], lines
        assert "on process 1 of 2" in lines[0], lines
    assert checkpoint_steps(model_dir) == [1, 2]
    assert not os.path.exists(os.path.join(model_dir, "checkpoints.corrupt"))

    start = time.time()
    procs = start_two(model_dir, "1:corrupt", "--gin.TRAIN_STEPS=2")
    logs = finish(procs)
    took_corrupt = time.time() - start
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
        assert "Resumed from checkpoint at step 1" in log, log[-3000:]
    assert len(os.listdir(os.path.join(model_dir, "checkpoints.corrupt"))) == 1
    assert checkpoint_steps(model_dir) == [1, 2]              # step 2 trained again
    print(f"two processes: out of memory {took_memory:.0f} s, corrupt {took_corrupt:.0f} s")
