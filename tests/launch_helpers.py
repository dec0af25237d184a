"""Running the real `python -m launch.train` in tests, and reading what it wrote."""

import contextlib
import logging
import os
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In-loop eval every 2 steps over 2 batches (tests/test_eval_*.py).
EVAL_ON = ("--gin.train_loop.train.eval_every_steps=2", "--gin.train_loop.train.eval_batches=2")


def launcher_command(launcher, model_dir, *extra, gin_file="tests/configs/tiny_run.gin"):
    return [sys.executable, "-m", f"launch.{launcher}", f"--gin_file={gin_file}",
            f"--gin.MODEL_DIR='{model_dir}'", *extra]


def train_command(model_dir, *extra, gin_file="tests/configs/tiny_run.gin"):
    return launcher_command("train", model_dir, *extra, gin_file=gin_file)


def train_env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1"}


def run_launcher(launcher, model_dir, *extra, gin_file="tests/configs/tiny_run.gin",
                 expect_rc=0):
    """Runs `python -m launch.<launcher>`; returns its stdout + stderr."""
    proc = subprocess.run(launcher_command(launcher, model_dir, *extra, gin_file=gin_file),
                          cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, log[-4000:]
    return log


def run_train(model_dir, *extra, gin_file="tests/configs/tiny_run.gin", expect_rc=0):
    return run_launcher("train", model_dir, *extra, gin_file=gin_file, expect_rc=expect_rc)


def start_train(model_dir, *extra):
    return subprocess.Popen(train_command(model_dir, *extra), cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(model_dir, step, proc, timeout=300):
    """Polls until checkpoint `step` is complete (Orbax renames it into place)."""
    path = os.path.join(model_dir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
        time.sleep(0.05)


def logged_losses(model_dir):
    return logged_scalars(model_dir, "loss")


def logged_scalars(model_dir, tag):
    """{step: value} of one TensorBoard scalar the run wrote to model_dir/train."""
    acc = EventAccumulator(os.path.join(model_dir, "train"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def checkpoint_steps(model_dir):
    return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints"))
                  if d.isdigit())


def overwrite_bytes_in_largest_array_file(step_dir):
    """The corruption drill: 16 bytes flipped at three places of the biggest array file
    of a checkpoint (as a bad disk or network copy would)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state"))
             for f in names]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, "r+b") as fh:
        for where in (size // 4, size // 2, 3 * size // 4):
            fh.seek(where)
            original = fh.read(16)
            fh.seek(where)
            fh.write(bytes(b ^ 0x5A for b in original))
    return largest


def launch_in_process(model_dir, *extra, gin_file="tests/configs/tiny_run.gin",
                      launcher="train"):
    """`launch.<launcher>.main` in this process (no start-up cost): returns the
    `error: ...` line it exits with, or None when it runs to the end. Leaves gin and
    logging as it found them."""
    import importlib
    entry_point = importlib.import_module(f"launch.{launcher}")
    from t5x_like.config import gin_config
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    gin_config.reset()
    try:
        entry_point.main([f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
                          *extra])
        return None
    except SystemExit as e:
        return str(e.code)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        gin_config.reset()


@contextlib.contextmanager
def read_only(path):
    """`path` read-only for this process: a read-only bind mount as root (for whom
    permissions do not count), chmod otherwise. Skips the test where neither works."""
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    mounted = subprocess.run(["mount", "--bind", path, path], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot bind-mount as root here: {mounted.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)
