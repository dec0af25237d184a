"""The train loop under faults: NaN/Inf losses, SIGTERM, SIGKILL, full disk, flipped bytes."""

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch_helpers import (REPO, checkpoint_steps, logged_losses, logged_scalars,
                            overwrite_bytes_in_largest_array_file, run_train, start_train,
                            train_command, train_env, wait_for_checkpoint)
from t5x_like.checkpointing import checkpoints
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.data import synthetic
from t5x_like.training import nonfinite, train_loop
from t5x_like.models import t5

CONFIG = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     num_encoder_layers=1, num_decoder_layers=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoisonedSource(synthetic.SyntheticEncDecSource):
    """Adds a `poison` feature that is 1 in the batch of one chosen step."""
    poison_at_batch: int

    def model_feature_lengths(self):
        return {**super().model_feature_lengths(), "poison": 1}

    def batch(self, *, step, shard_index, batch_size):
        poison = np.full((batch_size, 1), int(step == self.poison_at_batch), np.int32)
        return {**super().batch(step=step, shard_index=shard_index, batch_size=batch_size),
                "poison": poison}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoisonedModel(t5.EncoderDecoderModel):
    """The real model, whose loss turns NaN on a poisoned batch."""

    def loss_and_metrics(self, params, batch, *, dropout_rng):
        batch = dict(batch)
        poison = batch.pop("poison").max()
        loss, metrics = super().loss_and_metrics(params, batch, dropout_rng=dropout_rng)
        scale = jnp.where(poison > 0, jnp.nan, 1.0)     # NaN in the loss and its gradient
        return loss * scale, {**metrics, "loss_sum": metrics["loss_sum"] * scale}


def run(model_dir, policy, *, poison_at_batch=4, learning_rate=None, **train_kwargs):
    """The tiny T5 on synthetic data; batch `poison_at_batch` (step +1) has a NaN loss."""
    return train_loop.train(
        run=run_config.RunConfig(
            model=PoisonedModel(config=CONFIG),
            train_data=PoisonedSource(encoder_length=16, decoder_length=8, vocab_size=128,
                                      poison_at_batch=poison_at_batch),
            partitioner=functools.partial(partitioning.Partitioner,
                                          devices=jax.devices()[:1]),
            optimizer=optimizers.adafactor(learning_rate=learning_rate or
                                           optimizers.rsqrt_schedule(warmup_steps=10)),
            batch_size=4),
        model_dir=model_dir, on_nonfinite_loss=policy, log_every_steps=1,
        **{"train_steps": 6, "checkpoint_every_steps": 1, "keep_checkpoints": None,
           **train_kwargs})


def overflowing_learning_rate(step):
    """A learning rate that has overflowed float32: loss and gradient stay finite, the
    update does not."""
    return jnp.inf + 0.0 * step


def saved_params(model_dir, step):
    ckpt = checkpoints.Checkpointer(directory=os.path.join(model_dir, "checkpoints"))
    params = ckpt.read_state(step)["params"]
    ckpt.close()
    return params


def test_nan_halts_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(nonfinite.NonFiniteError,
                       match=r"The loss became NaN/Inf at step 5 \(the update was not "
                             r"applied\); the last good checkpoint is step 4") as error:
        run(str(tmp_path), "halt")
    assert isinstance(error.value, FloatingPointError)
    assert "rerun to resume from that checkpoint" in error.value.fix
    assert checkpoint_steps(str(tmp_path)) == [1, 2, 3, 4]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(str(tmp_path), 4)))
    # The step that stopped the run still has its point (written on the way out:
    # log points are written one step late).
    losses = logged_losses(str(tmp_path))
    assert sorted(losses) == [1, 2, 3, 4, 5] and np.isnan(losses[5])


def test_nan_skip_update_leaves_the_state_untouched_and_goes_on(tmp_path):
    result = run(str(tmp_path), "skip_update")
    assert result.final_step == 6 and np.isnan(result.losses[5])
    before, after, later = (saved_params(str(tmp_path), s) for s in (4, 5, 6))
    jax.tree.map(np.testing.assert_array_equal, before, after)        # step 5 skipped
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(later)))


def test_the_logged_learning_rate_is_the_one_applied_after_a_skipped_step(tmp_path):
    """Step 5's update is dropped (NaN), optimizer state included, so from then on the
    optimizer's own count is one behind the train state's step: step 6 applies
    lr(count 4), not lr(5), and that is the rate its log line must show."""
    schedule = optimizers.rsqrt_schedule(base_learning_rate=0.01, warmup_steps=1)
    result = run(str(tmp_path), "skip_update", learning_rate=schedule)
    state = result.final_state
    assert int(state.step) == 6 and int(state.opt_state.count) == 5   # 5 applied
    logged = logged_scalars(str(tmp_path), "learning_rate")
    count_before = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4}
    assert logged == {step: float(np.float32(schedule(count)))
                      for step, count in count_before.items()}
    assert logged[6] == np.float32(0.01 / 2) != np.float32(0.01 / np.sqrt(5))


def test_a_nonfinite_update_is_named_and_a_fresh_run_is_not_told_to_resume(tmp_path):
    with pytest.raises(nonfinite.NonFiniteError) as error:
        run(str(tmp_path), "halt", poison_at_batch=-1,
            learning_rate=overflowing_learning_rate, checkpoint_every_steps=5)
    assert error.value.what.startswith("The update became NaN/Inf at step 1 ")
    assert "no checkpoint was written before it" in error.value.what
    assert "resume" not in error.value.fix and "start again" in error.value.fix


def test_skip_update_stops_after_n_in_a_row_keeping_the_checkpoint_before_them(
        tmp_path, caplog):
    model_dir = str(tmp_path)
    run(model_dir, "halt", poison_at_batch=-1, train_steps=3, keep_checkpoints=2)
    assert checkpoint_steps(model_dir) == [2, 3]
    # Every update from step 4 on overflows; each step still saves a checkpoint.
    with pytest.raises(nonfinite.NonFiniteError,
                       match=r"4 steps in a row \(4-7\) had a NaN/Inf update and were "
                             r"skipped; step 3, saved before the first of them, is kept"):
        run(model_dir, "skip_update", poison_at_batch=-1, train_steps=20,
            keep_checkpoints=2, learning_rate=overflowing_learning_rate,
            max_consecutive_skipped_steps=4)
    assert checkpoint_steps(model_dir) == [3, 5, 6]     # 3 survives the rotation
    jax.tree.map(np.testing.assert_array_equal, saved_params(model_dir, 3),
                 saved_params(model_dir, 6))
    assert "Skipped updates (NaN/Inf) at 4 step(s): 4-7 (update)" in caplog.text


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    model_dir = str(tmp_path)
    proc = start_train(model_dir, "--gin.TRAIN_STEPS=100000",
                       "--gin.train_loop.train.checkpoint_every_steps=2")
    wait_for_checkpoint(model_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Preempted (SIGTERM): saved step" in out
    saved = int(out.split("Preempted (SIGTERM): saved step ")[1].split(";")[0])
    assert checkpoint_steps(model_dir)[-1] == saved >= 2


def test_sigkill_then_restart_is_bit_exact(tmp_path, straight_run):
    """Run 6 steps straight; run again, SIGKILL it after step 2's checkpoint,
    restart, finish: losses and final parameters are bitwise equal."""
    model_dir = str(tmp_path)
    proc = start_train(model_dir, "--gin.TRAIN_STEPS=6",
                       "--gin.train_loop.train.async_checkpointing=False")
    wait_for_checkpoint(model_dir, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = checkpoint_steps(model_dir)[-1]
    assert proc.returncode == -signal.SIGKILL and killed_at < 6

    log = run_train(model_dir, "--gin.TRAIN_STEPS=6")
    assert f"Resumed from checkpoint at step {killed_at}" in log
    assert logged_losses(model_dir) == logged_losses(straight_run)
    jax.tree.map(np.testing.assert_array_equal, saved_params(model_dir, 6),
                 saved_params(straight_run, 6))


@pytest.fixture
def finished_run(tmp_path, straight_run):
    """A copy of a finished 6-step run (checkpoints 4, 5, 6)."""
    model_dir = str(tmp_path / "run")
    shutil.copytree(straight_run, model_dir)
    return model_dir


def test_sigterm_during_start_up_exits_cleanly_losing_nothing(finished_run):
    proc = start_train(finished_run, "--gin.TRAIN_STEPS=8")
    lines = []
    for line in proc.stdout:              # before the loop (and its old handler) exists
        lines.append(line)
        if "Devices:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "Preempted (SIGTERM) during start-up, before step 7: nothing new to save" in out
    assert checkpoint_steps(finished_run) == [4, 5, 6]


def _disk_full():
    """In the child: files over 1 MB cannot be written (EFBIG), like a full disk. The
    array data of a checkpoint (2 MB) is the only such file."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))


def test_disk_full_mid_run_is_one_line_naming_the_step_that_failed(finished_run):
    """Resumed at 6, saving at 10, 15 and 16: the write of step 10 fails in the
    background, and the error names step 10 (not the next save's step), last."""
    proc = subprocess.run(
        train_command(finished_run, "--gin.TRAIN_STEPS=16",
                      "--gin.train_loop.train.checkpoint_every_steps=5"),
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
        preexec_fn=_disk_full)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Writing the checkpoint for step 10 to "), last
    assert "the last complete checkpoint is step 6, intact — free disk space" in last
    for noise in ("Traceback", "Exception ignored", "_SignalingThread"):
        assert noise not in proc.stderr, noise
    assert checkpoint_steps(finished_run) == [4, 5, 6]


def test_flipped_bytes_resume_from_the_previous_checkpoint_bit_exactly(finished_run,
                                                                      straight_run):
    overwrite_bytes_in_largest_array_file(os.path.join(finished_run, "checkpoints", "6"))
    log = run_train(finished_run, "--gin.TRAIN_STEPS=6")
    assert "Checkpoint step 6 at" in log and "is unreadable or corrupt" in log
    assert "Resumed from checkpoint at step 5" in log
    assert logged_losses(finished_run) == logged_losses(straight_run)   # step 6 again
    jax.tree.map(np.testing.assert_array_equal, saved_params(finished_run, 6),
                 saved_params(straight_run, 6))
    assert os.listdir(os.path.join(finished_run, "checkpoints.corrupt"))[0].startswith("6-")
