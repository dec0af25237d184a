import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t5x_like.reporting import metrics
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.training import train_loop
from t5x_like.data import synthetic
from t5x_like.models import t5


def test_tensorboard_events_read_back(tmp_path):
    writer = metrics.TensorBoardWriter(logdir=str(tmp_path))
    for step, loss in [(10, 5.5), (20, 4.25)]:
        writer.write_scalars(step, {"loss": loss, "learning_rate": 0.01})
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(10, 5.5), (20, 4.25)]
    assert math.isclose(acc.Scalars("learning_rate")[0].value, 0.01, rel_tol=1e-6)


def test_progress_line_has_eta_and_throughput():
    progress = metrics.Progress(total_steps=100, start_step=0)
    progress.add_tokens(1000)
    rates = progress.tick(10)
    assert rates["tokens_per_sec"] > 0 and rates["eta_s"] >= 0
    line = progress.line(10, {"loss": 3.0, "accuracy": 0.5, "learning_rate": 0.01}, rates)
    assert line.startswith("step  10/100 | loss 3.0000") and "ETA" in line
    assert metrics.format_duration(3725) == "1h02m"


def _logged(model_dir, tag):
    acc = EventAccumulator(os.path.join(model_dir, "train"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaddedSource(synthetic.SyntheticEncDecSource):
    """Synthetic batches whose targets end in a random amount of padding, so every
    step has its own number of target tokens (the weights of the interval means)."""

    def batch(self, *, step, shard_index, batch_size):
        batch = super().batch(step=step, shard_index=shard_index, batch_size=batch_size)
        rng = np.random.default_rng((step, shard_index, 7))
        keep = rng.integers(1, self.decoder_length + 1, (batch_size, 1))
        real = np.arange(self.decoder_length)[None, :] < keep
        batch["decoder_target_tokens"] = batch["decoder_target_tokens"] * real
        batch["decoder_loss_weights"] = real.astype(np.int32)
        return batch


def _train(model_dir, steps, log_every_steps):
    config = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                         num_encoder_layers=1, num_decoder_layers=1)
    return train_loop.train(
        run=run_config.RunConfig(
            model=t5.EncoderDecoderModel(config=config),
            train_data=PaddedSource(encoder_length=16, decoder_length=8, vocab_size=128),
            partitioner=functools.partial(partitioning.Partitioner,
                                          devices=jax.devices()[:1]),
            optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule(
                warmup_steps=10)),
            batch_size=4),
        model_dir=model_dir, train_steps=steps, checkpoint_every_steps=1,
        keep_checkpoints=None, log_every_steps=log_every_steps, async_checkpointing=False)


def test_logged_metrics_average_the_log_interval(tmp_path):
    """log_every_steps=3 logs, at steps 3 and 6 (progress line and TensorBoard), the
    target-token-weighted means of the loss and accuracy that log_every_steps=1 logs
    for each step, and the plain mean of the norms; a run stopped and resumed in the
    middle of an interval logs exactly the same values."""
    every_step = str(tmp_path / "every_step")
    _train(every_step, 6, log_every_steps=1)
    tags = ("loss", "accuracy", "target_tokens", "grad_norm", "learning_rate")
    per_step = {tag: _logged(every_step, tag) for tag in tags}
    every3 = str(tmp_path / "every3")
    result = _train(every3, 6, log_every_steps=3)
    logged = {tag: _logged(every3, tag) for tag in tags}
    assert sorted(logged["loss"]) == sorted(result.losses) == [3, 6]
    assert all(np.float32(result.losses[s]) == logged["loss"][s] for s in (3, 6))
    for end in (3, 6):
        steps = range(end - 2, end + 1)
        tokens = np.array([per_step["target_tokens"][s] for s in steps])
        assert len(set(tokens)) == 3             # the weighting matters
        for tag in ("loss", "accuracy"):
            values = np.array([per_step[tag][s] for s in steps])
            expected = float((values * tokens).sum() / tokens.sum())
            assert math.isclose(logged[tag][end], expected, rel_tol=1e-6), tag
            if tag == "loss":                    # not the plain mean over steps
                assert not math.isclose(logged[tag][end], float(values.mean()),
                                        rel_tol=1e-5)
        assert math.isclose(logged["grad_norm"][end],
                            np.mean([per_step["grad_norm"][s] for s in steps]), rel_tol=1e-6)
        assert math.isclose(logged["target_tokens"][end], tokens.mean(), rel_tol=1e-6)
        assert logged["learning_rate"][end] == per_step["learning_rate"][end]

    # Stopped at step 4 (its last step logs the open interval, {4}), then resumed:
    # the checkpoint carries the interval's sums, so step 6 still covers steps 4-6.
    resumed = str(tmp_path / "resumed")
    _train(resumed, 4, log_every_steps=3)
    second = _train(resumed, 6, log_every_steps=3)
    losses = _logged(resumed, "loss")
    assert sorted(losses) == [3, 4, 6] and second.start_step == 4
    assert losses[3] == logged["loss"][3] and losses[6] == logged["loss"][6]
    assert math.isclose(losses[4], per_step["loss"][4], rel_tol=1e-6)


def test_interval_means_leave_out_dropped_steps():
    interval = metrics.IntervalMeans()
    step = lambda loss, tokens, nonfinite: {
        "loss": jnp.float32(loss), "accuracy": jnp.float32(0.5), "grad_norm": jnp.float32(loss),
        "target_tokens": jnp.float32(tokens), "learning_rate": jnp.float32(0.1 * tokens),
        "nonfinite": jnp.float32(nonfinite)}
    interval.add(step(2.0, 10, 0))
    interval.add(step(float("nan"), 20, 1))
    interval.add(step(5.0, 30, 0))
    means = interval.means()
    assert means["loss"] == (2.0 * 10 + 5.0 * 30) / 40 and means["grad_norm"] == 3.5
    assert means["nonfinite"] == 1.0 and math.isclose(means["learning_rate"], 3.0)
    resumed = metrics.IntervalMeans(sums=interval.sums())
    assert resumed.means() == means
    interval.reset()
    assert interval.sums() == {}


_ORDER: list[tuple[str, int]] = []     # what the loop did, in order (the test below)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RecordedSource(PaddedSource):
    def batch(self, *, step, shard_index, batch_size):
        _ORDER.append(("batch for step", step + 1))
        return super().batch(step=step, shard_index=shard_index, batch_size=batch_size)


class _ProgressLines(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("step "):
            _ORDER.append(("line of step", int(message.split()[1].split("/")[0])))


def test_a_log_point_is_written_after_the_next_step_is_dispatched(tmp_path):
    """At log_every_steps=1 the loop reads step N's metrics only after it has pulled
    step N+1's batch and dispatched it, so the device is never idle while the host
    formats and writes a log point; the values logged are those of log_every=1
    before (test above)."""
    _ORDER.clear()
    handler, logger = _ProgressLines(), logging.getLogger("t5x_like")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16,
                             mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
        result = train_loop.train(
            run=run_config.RunConfig(
                model=t5.EncoderDecoderModel(config=config),
                train_data=_RecordedSource(encoder_length=16, decoder_length=8,
                                           vocab_size=128),
                partitioner=functools.partial(partitioning.Partitioner,
                                              devices=jax.devices()[:1]),
                optimizer=optimizers.adafactor(
                    learning_rate=optimizers.rsqrt_schedule(warmup_steps=10)),
                batch_size=4),
            model_dir=str(tmp_path), train_steps=4, checkpoint_every_steps=100,
            log_every_steps=1, async_checkpointing=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert _ORDER == [("batch for step", 1), ("batch for step", 2), ("line of step", 1),
                      ("batch for step", 3), ("line of step", 2),
                      ("batch for step", 4), ("line of step", 3), ("line of step", 4)]
