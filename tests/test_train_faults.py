"""The train loop under faults: NaN/Inf losses, SIGTERM, SIGKILL."""

import dataclasses
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch_helpers import (checkpoint_steps, logged_losses, run_train, start_train,
                            wait_for_checkpoint)
from t5x_like import checkpoints, optimizers, partitioning, run_config
from t5x_like.data import synthetic
from t5x_like import train as train_lib
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


def run(model_dir, policy):
    return train_lib.train(
        run=run_config.RunConfig(
            model=PoisonedModel(config=CONFIG),
            train_data=PoisonedSource(encoder_length=16, decoder_length=8, vocab_size=128,
                                      poison_at_batch=4),
            partitioner=functools.partial(partitioning.Partitioner,
                                          devices=jax.devices()[:1]),
            optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule(
                warmup_steps=10)),
            batch_size=4),
        model_dir=model_dir, train_steps=6, checkpoint_every_steps=1, keep_checkpoints=None,
        on_nonfinite_loss=policy, log_every_steps=1)


def saved_params(model_dir, step):
    ckpt = checkpoints.Checkpointer(directory=os.path.join(model_dir, "checkpoints"))
    params = ckpt.read_state(step)["params"]
    ckpt.close()
    return params


def test_nan_halts_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 5; the last good "
                                                 r"checkpoint is step 4"):
        run(str(tmp_path), "halt")
    assert checkpoint_steps(str(tmp_path)) == [1, 2, 3, 4]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(str(tmp_path), 4)))


def test_nan_skip_update_leaves_the_state_untouched_and_goes_on(tmp_path):
    result = run(str(tmp_path), "skip_update")
    assert result.final_step == 6 and np.isnan(result.losses[5])
    before, after, later = (saved_params(str(tmp_path), s) for s in (4, 5, 6))
    jax.tree.map(np.testing.assert_array_equal, before, after)        # step 5 skipped
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(later)))


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    model_dir = str(tmp_path)
    proc = start_train(model_dir, "--gin.TRAIN_STEPS=100000",
                       "--gin.train_lib.train.checkpoint_every_steps=2")
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
                       "--gin.train_lib.train.async_checkpointing=False")
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
