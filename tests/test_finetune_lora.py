"""LoRA (finetuning/lora.py): exact at the start, trains the adapters only, merges
into the kernels it adapts, and is the same on any mesh."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like import tree_paths
from t5x_like.finetuning import lora, trainable
from t5x_like.models import decoder, t5
from t5x_like.parallel import partitioning
from t5x_like.training import optimizers, trainer

T5_CONFIG = t5.T5Config(vocab_size=256, emb_dim=32, num_heads=8, head_dim=8, mlp_dim=64,
                        num_encoder_layers=2, num_decoder_layers=2)
DECODER_CONFIG = decoder.DecoderConfig(vocab_size=256, emb_dim=32, num_heads=8,
                                       num_kv_heads=4, head_dim=8, mlp_dim=64, num_layers=2)
LENGTHS = {"encoder_input_tokens": 16, "decoder_target_tokens": 8}
ADAPTER = lora.LoRA(rank=4, alpha=8.0, targets="all_linear")


def make_model(family, *, scan=False, adapter=ADAPTER):
    if family == "t5":
        return t5.EncoderDecoderModel(config=dataclasses.replace(T5_CONFIG, scan_layers=scan),
                                      adapter=adapter)
    return decoder.DecoderOnlyModel(config=dataclasses.replace(DECODER_CONFIG, scan_layers=scan),
                                    adapter=adapter)


def batch_for(family, seed=0, batch_size=8):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 250, (batch_size, 8), dtype=np.int32)
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    batch = {"decoder_target_tokens": targets, "decoder_input_tokens": inputs,
             "decoder_loss_weights": np.ones_like(targets)}
    if family == "t5":
        batch["encoder_input_tokens"] = rng.integers(2, 250, (batch_size, 16), dtype=np.int32)
    return batch


@functools.lru_cache(maxsize=None)
def base_params(family, scan):
    """The base model's own parameters (no adapter), as a pretrained run has them."""
    model = make_model(family, scan=scan, adapter=None)
    kw = model.init_lengths(LENGTHS)
    return jax.device_get(nn.unbox(model.init_params(jax.random.key(7), batch_size=1, **kw)))


def adapted_params(family, scan, seed=0):
    """The adapted model's parameters: fresh adapters on the base's values."""
    model = make_model(family, scan=scan)
    fresh = nn.unbox(model.init_params(jax.random.key(seed), batch_size=1,
                                       **model.init_lengths(LENGTHS)))
    adapters, _ = trainable.split(fresh, lora.TRAINABLE_PATTERN)
    return trainable.merge(jax.device_get(adapters), base_params(family, scan))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["loop", "scan"])   # scanned: ~25 s each, the slow pass
@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_lora_at_init_is_exactly_the_base_model(family, scan):
    params = adapted_params(family, scan)
    names = [k for k in tree_paths.flatten(params) if "lora" in k]
    # every projection of every layer got A and B: q, k, v, o (+ cross-attention's in
    # T5's decoder) and the MLP's wi_0, wi_1, wo
    per_layer = {"t5": (4 + 3) * 2 + (4 + 4 + 3) * 2, "decoder": (4 + 3) * 2}[family]
    assert len(names) == per_layer * (1 if scan else 2)
    batch = batch_for(family)
    base = make_model(family, scan=scan, adapter=None).logits(base_params(family, scan), batch)
    adapted = make_model(family, scan=scan).logits(params, batch)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def run_steps(family, partitioner, *, steps=3, scan=False, adapter=ADAPTER):
    """`steps` train steps of the adapted model on `partitioner`'s mesh, from the same
    base and adapters: (state, frozen, initial adapters, losses)."""
    model = make_model(family, scan=scan, adapter=adapter)
    optimizer = optimizers.adamw(learning_rate=optax.constant_schedule(1e-2),
                                 weight_decay=0.0)
    lengths = LENGTHS if family == "t5" else {"decoder_target_tokens": 8}
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=lengths)
    state = trainer.init_train_state(model=model, optimizer=optimizer,
                                     partitioner=partitioner, feature_lengths=lengths,
                                     seed=0, layout=layout)
    adapters, frozen = trainable.split(adapted_params(family, scan), lora.TRAINABLE_PATTERN)
    state = state.replace(params=jax.device_put(adapters, layout.shardings.params))
    frozen = jax.device_put(jax.tree.map(lambda x: x.astype(adapter.frozen_dtype), frozen),
                            layout.frozen.shardings)
    step = trainer.jit_train_step(
        trainer.make_train_step(model=model, optimizer=optimizer, dropout_seed=0),
        partitioner=partitioner, layout=layout, batch_feature_names=tuple(batch_for(family)))
    losses = []
    for i in range(steps):
        state, metrics = step(state, partitioning.global_batch(batch_for(family, seed=i),
                                                                partitioner), frozen)
        losses.append(float(metrics["loss"]))
    return state, frozen, adapters, losses


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_steps_train_the_adapters_and_leave_the_base_bitwise_alone(family):
    one_device = partitioning.Partitioner(devices=jax.devices()[:1])
    state, frozen, initial, losses = run_steps(family, one_device)
    # The state holds the adapters only; so does the optimizer state.
    assert all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b")
               for k in tree_paths.flatten(state.params))
    adapter_numbers = sum(x.size for x in jax.tree.leaves(state.params))
    moments = [x.size for x in jax.tree.leaves(state.opt_state) if x.size > 1]
    assert sum(moments) == 2 * adapter_numbers          # Adam's m and v, nothing more
    # Every adapter moved (B from zero), the base is the one given, bit for bit.
    for name, value in tree_paths.flatten(state.params).items():
        assert not np.array_equal(np.asarray(value), tree_paths.flatten(initial)[name]), name
    base = trainable.split(adapted_params(family, False), lora.TRAINABLE_PATTERN)[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, base)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family,scan", [
    ("t5", False), pytest.param("decoder", True, marks=pytest.mark.slow)],   # scanned: ~23 s
    ids=["t5_loop", "decoder_scan"])
def test_merged_adapters_give_the_adapted_models_logits(family, scan):
    state, frozen, _, _ = run_steps(family, partitioning.Partitioner(
        devices=jax.devices()[:1]), steps=1, scan=scan)
    params = jax.device_get(trainable.merge(state.params, frozen))
    batch = batch_for(family, seed=5)
    adapted = make_model(family, scan=scan).logits(params, batch)
    merged = lora.merged(params, scale=ADAPTER.scale)
    assert not any("lora" in k for k in tree_paths.flatten(merged))
    plain = make_model(family, scan=scan, adapter=None).logits(merged, batch)
    base = make_model(family, scan=scan, adapter=None).logits(frozen, batch)
    assert float(jnp.abs(adapted - base).max()) > 1e-2         # the adapters matter
    np.testing.assert_allclose(np.asarray(plain), np.asarray(adapted), atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def one_device_t5():
    state, _, _, losses = run_steps("t5", partitioning.Partitioner(devices=jax.devices()[:1]))
    return state, losses


@pytest.mark.parametrize("preset", [dict(data_parallelism=1, fsdp_parallelism=8),
                                    dict(data_parallelism=1, tensor_parallelism=8),
                                    pytest.param(dict(data_parallelism=2, fsdp_parallelism=2,
                                                      tensor_parallelism=2),
                                                 marks=pytest.mark.slow)],
                         ids=["fsdp", "tp", "dp_fsdp_tp"])
def test_sharded_lora_equals_one_device(preset, one_device_t5):
    ref_state, ref_losses = one_device_t5
    partitioner = partitioning.Partitioner(**preset)
    state, frozen, _, losses = run_steps("t5", partitioner)
    # The adapters really are split like their kernels (A's embed, B's heads/mlp).
    specs = {str(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding,
                                                               state.params))}
    assert any("fsdp" in s or "model" in s for s in specs), specs
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    # Adam divides by sqrt(v): a gradient element near zero, summed in another order
    # on another mesh, moves its parameter by a visibly different share of the 1e-2
    # step. 3e-5 is 0.3% of one step (seen: 6.4e-6).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=2e-5, atol=3e-5),
                 state.params, ref_state.params)


def test_a_bfloat16_base_is_held_in_bfloat16_and_trains_alike():
    one_device = partitioning.Partitioner(devices=jax.devices()[:1])
    _, _, _, f32_losses = run_steps("decoder", one_device)
    state, frozen, _, losses = run_steps(
        "decoder", one_device, adapter=dataclasses.replace(ADAPTER, frozen_dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    # The base's values rounded to bfloat16 (8 bits of mantissa) move the loss of this
    # float32-compute model by well under 1%.
    np.testing.assert_allclose(losses, f32_losses, rtol=5e-3)
    assert losses != f32_losses


def test_lora_dropout_acts_on_the_adapter_input_only():
    params = adapted_params("decoder", False)
    flat = tree_paths.flatten(params)
    # A nonzero B, so the adapter contributes.
    params = jax.tree.unflatten(jax.tree.structure(params), [
        np.full_like(v, 0.05) if k.endswith("lora_b") else v for k, v in flat.items()])
    batch = batch_for("decoder")
    with_dropout = make_model("decoder", adapter=dataclasses.replace(ADAPTER, dropout_rate=0.5))
    no_dropout = make_model("decoder")
    rng = jax.random.key(3)
    eval_logits = no_dropout.logits(params, batch)
    assert not np.allclose(with_dropout.logits(params, batch, dropout_rng=rng), eval_logits)
    # The same model with a zero rate is unchanged by the rng (base dropout is 0).
    np.testing.assert_array_equal(no_dropout.logits(params, batch, dropout_rng=rng),
                                  eval_logits)
    np.testing.assert_array_equal(with_dropout.logits(params, batch), eval_logits)


def test_bad_lora_settings_are_config_errors():
    from t5x_like import errors
    with pytest.raises(errors.ConfigError, match="rank"):
        lora.LoRA(rank=0)
    with pytest.raises(errors.ConfigError, match="regular expression"):
        lora.LoRA(targets="(unclosed")
