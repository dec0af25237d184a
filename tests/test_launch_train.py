"""The real entry point, as a user runs it: train, stop, rerun, resume."""

import os

import pytest

from launch_helpers import checkpoint_steps, logged_losses, run_train


def test_two_steps_then_resume_continues_from_the_checkpoint(tmp_path, straight_run):
    model_dir = str(tmp_path)
    log = run_train(model_dir)
    assert "Initialised a new model" in log and "Total parameters:" in log
    # Quiet by default: none of TensorFlow's start-up notices, one summary row per
    # module; the full table (a row per parameter) is in parameters.txt.
    for noise in ("oneDNN", "cuda drivers", "cuInit", "cache_dataset_ops", "absl::"):
        assert noise not in log, noise
    assert "encoder/layers_0/attention/query/kernel" not in log
    table = open(os.path.join(model_dir, "parameters.txt")).read()
    assert "encoder/layers_0/attention/query/kernel" in table and "Total parameters:" in table
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


@pytest.mark.parametrize("objective", ["lm", "prefix_lm"])
def test_decoder_only_objectives_train_through_the_entry_point(tmp_path, objective):
    log = run_train(str(tmp_path), gin_file=f"tests/configs/tiny_{objective}_run.gin")
    assert "DecoderOnlyModel" in open(os.path.join(tmp_path, "operative_config.gin")).read()
    losses = logged_losses(str(tmp_path))
    assert sorted(losses) == [1, 2] and all(8.0 < v < 10.0 for v in losses.values()), log[-2000:]
    assert checkpoint_steps(str(tmp_path)) == [1, 2]


@pytest.mark.parametrize("impl,reason", [
    ("cudnn", "cudnn needs a GPU"),
    # The same console path; a training run each, so the second waits for the slow pass.
    pytest.param("splash", "splash attention needs a TPU", marks=pytest.mark.slow)])
def test_a_kernel_the_machine_lacks_is_one_console_line_naming_what_runs(tmp_path, impl,
                                                                         reason):
    """On CPU the requested kernel falls back to xla in every layer and trace; the
    user sees that once, at the default verbosity."""
    log = run_train(str(tmp_path), "--gin.TRAIN_STEPS=1",
                    f"--gin.t5.T5Config.attention_impl='{impl}'")
    lines = [line for line in log.splitlines() if "requested but" in line]
    assert len(lines) == 1, log[-3000:]
    assert lines[0].endswith(f"attention: {impl} requested but {reason} (backend is cpu); "
                             "falling back to xla."), lines
