"""In-loop eval through the real entry point: training stays bitwise the same, also
across a SIGKILL and resume, and every task of a mixture is evaluated on its own."""

import os
import signal

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import (EVAL_ON, checkpoint_steps, logged_losses, run_train,
                            start_train, wait_for_checkpoint)
from t5x_like.checkpointing import checkpoints

TASK = "pydocs_span_corruption"


def eval_scalars(model_dir, task=TASK):
    acc = EventAccumulator(os.path.join(model_dir, "eval", task))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in ("loss", "cross_entropy", "perplexity", "accuracy", "target_tokens")}


def final_params(model_dir):
    reader = checkpoints.Checkpointer(directory=os.path.join(model_dir, "checkpoints"))
    params = reader.read_state(6)["params"]
    reader.close()
    return params


def test_eval_on_changes_no_training_loss_and_writes_eval_metrics(eval_run, straight_run):
    model_dir, log = eval_run
    assert logged_losses(model_dir) == logged_losses(straight_run)       # bitwise
    jax.tree.map(np.testing.assert_array_equal, final_params(model_dir),
                 final_params(straight_run))
    scalars = eval_scalars(model_dir)
    assert all(sorted(values) == [2, 4, 6] for values in scalars.values())
    assert scalars["target_tokens"] == {2: 128.0, 4: 128.0, 6: 128.0}  # 2 batches of 8x8
    for step in (2, 4, 6):
        np.testing.assert_allclose(scalars["perplexity"][step],
                                   np.exp(scalars["cross_entropy"][step]), rtol=1e-5)
        assert f"eval step {step} | {TASK} | loss" in log
    assert scalars["loss"][6] < scalars["loss"][2]    # the model does learn something
    assert not os.path.exists(os.path.join(straight_run, "eval"))     # off by default


@pytest.mark.slow   # a minute; SIGKILL bit-exactness without eval stays in the default suite
def test_sigkill_and_resume_with_eval_on_is_bit_exact(tmp_path, eval_run, straight_run):
    model_dir = str(tmp_path)
    proc = start_train(model_dir, "--gin.TRAIN_STEPS=6",
                       "--gin.train_loop.train.async_checkpointing=False", *EVAL_ON)
    wait_for_checkpoint(model_dir, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = checkpoint_steps(model_dir)[-1]
    assert proc.returncode == -signal.SIGKILL and killed_at < 6

    log = run_train(model_dir, "--gin.TRAIN_STEPS=6", *EVAL_ON)
    assert f"Resumed from checkpoint at step {killed_at}" in log
    assert logged_losses(model_dir) == logged_losses(straight_run)
    # Evaluations after the restart score the same parameters on the same batches.
    uninterrupted, resumed = eval_scalars(eval_run[0]), eval_scalars(model_dir)
    assert 6 in resumed["loss"]
    for tag, values in resumed.items():
        assert values == {s: uninterrupted[tag][s] for s in values}, tag


def test_a_mixture_is_evaluated_task_by_task():
    import data.tasks  # noqa: F401 - registers the bundled tasks
    from t5x_like.data import pipeline
    source = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_mixture",
                                      task_feature_lengths={"inputs": 32, "targets": 8})
    sources = source.eval_sources(split="validation")
    assert sorted(sources) == ["pydocs_prefix_lm", "pydocs_span_corruption"]
    for name, member in sources.items():
        assert (member.mixture_or_task_name, member.split, member.shuffle) == (
            name, "validation", False)
        assert member.model_feature_lengths() == source.model_feature_lengths()
