"""Running the real `python -m launch.train` in tests, and reading what it wrote."""

import os
import subprocess
import sys
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In-loop eval every 2 steps over 2 batches (tests/test_eval_*.py).
EVAL_ON = ("--gin.train_lib.train.eval_every_steps=2", "--gin.train_lib.train.eval_batches=2")


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
    acc = EventAccumulator(os.path.join(model_dir, "train"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss")}


def checkpoint_steps(model_dir):
    return sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints"))
                  if d.isdigit())

