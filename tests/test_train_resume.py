"""train(): the data position in each checkpoint, and resuming from old checkpoints."""

import functools
import logging
import os
import shutil

import jax
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import run_config
from t5x_like.training import train_loop
from t5x_like.data import synthetic
from t5x_like.models import t5

CONFIG = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                     num_encoder_layers=1, num_decoder_layers=1)


def run(model_dir, steps, *, data_seed=0, init_seed=0):
    return train_loop.train(
        run=run_config.RunConfig(
            model=t5.EncoderDecoderModel(config=CONFIG),
            train_data=synthetic.SyntheticEncDecSource(encoder_length=16, decoder_length=8,
                                                       vocab_size=128, seed=data_seed),
            seed=init_seed,
            partitioner=functools.partial(partitioning.Partitioner,
                                          devices=jax.devices()[:1]),
            optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule(
                warmup_steps=10)),
            batch_size=4),
        model_dir=model_dir, train_steps=steps, num_data_shards=2,
        checkpoint_every_steps=1, keep_checkpoints=None, log_every_steps=1,
        async_checkpointing=False)


def test_positions_per_shard_and_an_old_checkpoint_without_them_resumes_by_replay(
        tmp_path, caplog):
    straight = run(str(tmp_path / "straight"), 4).losses
    run(str(tmp_path / "resumed"), 2)
    item = tmp_path / "resumed" / "checkpoints" / "2" / "data_positions"
    assert sorted(f for f in os.listdir(item) if f.startswith("shard")) == [
        "shard_00000_of_00002.position", "shard_00001_of_00002.position"]
    assert (item / "shard_00001_of_00002.position").read_bytes() == b'{"step": 2}'

    shutil.rmtree(item)                       # as written before positions were saved
    with caplog.at_level(logging.INFO):
        result = run(str(tmp_path / "resumed"), 4)
    assert "has no saved input positions for data shards [0, 1]" in caplog.text
    assert result.start_step == 2
    assert result.losses == {s: straight[s] for s in (3, 4)}


def test_resume_checks_the_data_streams_seed_not_the_init_seed(tmp_path, caplog):
    """The data source's seed defines the stream; the run's init seed does not (it
    only matters for a new model, and a resumed run restores its parameters)."""
    model_dir = str(tmp_path / "run")
    run(model_dir, 1)
    with caplog.at_level(logging.WARNING):
        run(model_dir, 2, init_seed=5)
    assert "Checkpoint's data settings" not in caplog.text
    with caplog.at_level(logging.WARNING):
        run(model_dir, 3, data_seed=1)
    assert "data settings differ from this run's (data_stream.seed 0 -> 1)" in caplog.text
