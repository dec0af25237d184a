"""The train step's CPU compiler options: less memory, the same arithmetic."""

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.training import xla_options
from t5x_like.data import synthetic
from t5x_like.models import t5

# Big enough for activations to dominate XLA's temporaries (as in the issue-15 run).
CONFIG = t5.T5Config(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                     num_encoder_layers=4, num_decoder_layers=2, dtype="bfloat16")


def _steps_both_ways(num_steps=3):
    """{"ours" | "default": (compiled step, losses, final params)}: our options, XLA's defaults."""
    model = t5.EncoderDecoderModel(config=CONFIG)
    source = synthetic.SyntheticEncDecSource(encoder_length=128, decoder_length=32,
                                             vocab_size=CONFIG.vocab_size)
    lengths = source.model_feature_lengths()
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])   # one device
    optimizer = optimizers.adafactor(learning_rate=optax.constant_schedule(0.01))
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=lengths)
    train_step = trainer.make_train_step(model=model, optimizer=optimizer)
    ours = trainer.jit_train_step(train_step, partitioner=partitioner, layout=layout,
                                  batch_feature_names=tuple(lengths))
    batch_sharding = {name: partitioner.batch_sharding() for name in lengths}
    default = jax.jit(train_step, in_shardings=(layout.shardings, batch_sharding),
                      out_shardings=(layout.shardings,
                                     NamedSharding(partitioner.mesh, PartitionSpec())),
                      donate_argnums=(0,))
    results = {}
    for name, jitted in (("ours", ours), ("default", default)):
        state = trainer.init_train_state(model=model, optimizer=optimizer,
                                         partitioner=partitioner, feature_lengths=lengths,
                                         seed=0, layout=layout)
        batches = [partitioning.global_batch(
            source.batch(step=i, shard_index=0, batch_size=8), partitioner)
            for i in range(num_steps)]
        with partitioner.context():
            compiled = jitted.lower(state, batches[0]).compile()
        losses = []
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
        results[name] = (compiled, losses, jax.device_get(state.params))
    return results


def test_cpu_step_uses_the_memory_optimised_scheduler_and_keeps_the_arithmetic():
    results = _steps_both_ways()
    (ours, our_losses, our_params) = results["ours"]
    (default, default_losses, default_params) = results["default"]
    ours_temp = ours.memory_analysis().temp_size_in_bytes
    default_temp = default.memory_analysis().temp_size_in_bytes
    assert ours_temp < 0.9 * default_temp, (ours_temp, default_temp)
    # Scheduling orders the same ops: every loss and parameter is bitwise equal.
    assert our_losses == default_losses
    for a, b in zip(jax.tree.leaves(our_params), jax.tree.leaves(default_params)):
        np.testing.assert_array_equal(a, b)


def test_options_are_cpu_only():
    assert xla_options.train_step_options("cpu") == {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert xla_options.train_step_options("gpu") == {}
    assert xla_options.train_step_options("tpu") == {}
