"""One train step must not depend on how the model is laid out on devices."""

import jax
import numpy as np
import pytest

from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.models import t5

FEATURE_LENGTHS = {"encoder_input_tokens": 16, "decoder_target_tokens": 8}
# Dimensions divisible by 8 so every preset really splits them on 8 devices.
CONFIG = t5.T5Config(vocab_size=256, emb_dim=32, num_heads=8, head_dim=8, mlp_dim=64,
                     num_encoder_layers=2, num_decoder_layers=2)


def packed_batch(batch_size=8, seed=0):
    """Two examples packed per row, with padding at the end of each row."""
    rng = np.random.default_rng(seed)
    batch = {}
    for prefix, length, split in (("encoder", 16, 9), ("decoder", 8, 5)):
        segments = np.zeros((batch_size, length), np.int32)
        positions = np.zeros((batch_size, length), np.int32)
        segments[:, :split], segments[:, split:length - 2] = 1, 2
        positions[:, :split] = np.arange(split)
        positions[:, split:length - 2] = np.arange(length - 2 - split)
        batch[f"{prefix}_segment_ids"], batch[f"{prefix}_positions"] = segments, positions
    tokens = lambda length: rng.integers(3, 250, (batch_size, length), dtype=np.int32)
    batch["encoder_input_tokens"] = tokens(16) * (batch["encoder_segment_ids"] > 0)
    targets = tokens(8) * (batch["decoder_segment_ids"] > 0)
    inputs = np.zeros_like(targets)           # targets shifted right within each segment
    inputs[:, 1:] = targets[:, :-1]
    inputs[batch["decoder_positions"] == 0] = 0
    batch["decoder_target_tokens"], batch["decoder_input_tokens"] = targets, inputs
    batch["decoder_loss_weights"] = (targets > 0).astype(np.int32)
    return batch


def one_step(partitioner, optimizer, num_microbatches=1, return_initial_params=False):
    model = t5.EncoderDecoderModel(config=CONFIG)
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=FEATURE_LENGTHS)
    state = trainer.init_train_state(model=model, optimizer=optimizer,
                                     partitioner=partitioner,
                                     feature_lengths=FEATURE_LENGTHS, seed=0, layout=layout)
    initial_params = jax.device_get(state.params)
    batch = packed_batch()
    step = trainer.jit_train_step(
        trainer.make_train_step(model=model, optimizer=optimizer,
                                num_microbatches=num_microbatches),
        partitioner=partitioner, layout=layout, batch_feature_names=tuple(batch))
    state, metrics = step(state, partitioning.global_batch(batch, partitioner))
    if return_initial_params:
        return state, jax.device_get(metrics), initial_params
    return state, jax.device_get(metrics)


def adafactor():
    return optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule(warmup_steps=100),
                                min_dim_size_to_factor=32)


@pytest.fixture(scope="module")
def reference():
    state, metrics, initial = one_step(partitioning.Partitioner(devices=jax.devices()[:1]),
                                       adafactor(), return_initial_params=True)
    # The step really moved every parameter (a no-op step would also "agree").
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         state.params, initial)
    assert min(jax.tree.leaves(moved)) > 1e-4, moved
    # The reported loss is the model's own loss at the parameters before the step.
    direct, sums = t5.EncoderDecoderModel(config=CONFIG).loss_and_metrics(
        initial, packed_batch(), dropout_rng=None)
    np.testing.assert_allclose(metrics["loss"], direct / sums["weight_sum"], rtol=1e-6)
    return state, metrics


PRESETS = {
    "data_parallel": dict(data_parallelism=8),
    "fsdp": dict(data_parallelism=1, fsdp_parallelism=8),
    "tensor_parallel": dict(data_parallelism=1, tensor_parallelism=8),
    "fsdp_tp": dict(data_parallelism=1, fsdp_parallelism=4, tensor_parallelism=2),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_one_step_is_the_same_under_every_preset(reference, preset):
    ref_state, ref_metrics = reference
    part = partitioning.Partitioner(**PRESETS[preset])
    state, metrics = one_step(part, adafactor())
    assert jax.device_count() == 8
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-5, atol=2e-6),
                 state.params, ref_state.params)


@pytest.mark.parametrize("preset,axis", [("fsdp", "fsdp"), ("tensor_parallel", "model")])
def test_presets_really_split_parameters_and_optimizer_state(preset, axis):
    part = partitioning.Partitioner(**PRESETS[preset])
    layout = trainer.state_layout(model=t5.EncoderDecoderModel(config=CONFIG),
                                  optimizer=adafactor(), partitioner=part,
                                  feature_lengths=FEATURE_LENGTHS)
    param_axes = [s.spec for s in jax.tree.leaves(layout.shardings.params)]
    opt_axes = [s.spec for s in jax.tree.leaves(layout.shardings.opt_state)]
    flat = lambda specs: {a for spec in specs for entry in spec
                          for a in (entry if isinstance(entry, tuple) else (entry,))}
    assert axis in flat(param_axes)
    assert axis in flat(opt_axes)   # factored statistics inherit the surviving axis


def test_microbatches_give_the_full_batch_update(reference):
    ref_state, ref_metrics = reference
    state, metrics = one_step(partitioning.Partitioner(devices=jax.devices()[:1]),
                              adafactor(), num_microbatches=4)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["target_tokens"], ref_metrics["target_tokens"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-5, atol=2e-6),
                 state.params, ref_state.params)
