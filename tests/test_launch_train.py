"""The real entry point, as a user runs it: train, stop, rerun, resume."""

import os

from launch_helpers import checkpoint_steps, logged_losses, run_train


def test_two_steps_then_resume_continues_from_the_checkpoint(tmp_path, straight_run):
    model_dir = str(tmp_path)
    log = run_train(model_dir)
    assert "Initialised a new model" in log and "Total parameters:" in log
    assert "step 2/2 | loss" in log
    assert checkpoint_steps(model_dir) == [1, 2]
    operative = open(os.path.join(model_dir, "operative_config.gin")).read()
    assert "t5.T5Config.emb_dim = 32" in operative and "TRAIN_STEPS = 2" in operative
    assert sorted(logged_losses(model_dir)) == [1, 2]

    log = run_train(model_dir, "--gin.TRAIN_STEPS=4")
    assert "Resumed from checkpoint at step 2" in log
    assert "step 3/4" in log and "step 1/" not in log
    assert checkpoint_steps(model_dir)[-1] == 4

    # The resumed run sees the same batches and state as an uninterrupted one:
    # every logged loss is bitwise equal.
    resumed, straight = logged_losses(model_dir), logged_losses(straight_run)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == {step: straight[step] for step in range(1, 5)}
    assert len(set(resumed.values())) == 4      # the state really changed every step
