"""The real entry point, as a user runs it: train, stop, rerun, resume."""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(model_dir, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--gin_file=tests/configs/tiny_run.gin",
         f"--gin.MODEL_DIR='{model_dir}'", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def logged_losses(model_dir):
    acc = EventAccumulator(os.path.join(model_dir, "train"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss")}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps in one go: what the interrupted run below must reproduce."""
    model_dir = str(tmp_path_factory.mktemp("straight"))
    run_train(model_dir, "--gin.TRAIN_STEPS=4")
    return model_dir


def test_two_steps_then_resume_continues_from_the_checkpoint(tmp_path, straight_run):
    model_dir = str(tmp_path)
    log = run_train(model_dir)
    assert "Initialised a new model" in log and "Total parameters:" in log
    assert "step 2/2 | loss" in log
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["1", "2"]
    operative = open(os.path.join(model_dir, "operative_config.gin")).read()
    assert "t5.T5Config.emb_dim = 32" in operative and "TRAIN_STEPS = 2" in operative
    assert sorted(logged_losses(model_dir)) == [1, 2]

    log = run_train(model_dir, "--gin.TRAIN_STEPS=4")
    assert "Resumed from checkpoint at step 2" in log
    assert "step 3/4" in log and "step 1/" not in log
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints")))[-1] == "4"

    # The resumed run sees the same batches and state as an uninterrupted one:
    # every logged loss is bitwise equal.
    resumed, straight = logged_losses(model_dir), logged_losses(straight_run)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == straight
    assert len(set(straight.values())) == 4      # the state really changed every step
