"""A decoder-only (GQA) train step is the same under every partitioning preset."""


import jax
import numpy as np
import optax
import pytest

from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.models import decoder

LENGTH = 16
FEATURE_LENGTHS = {'decoder_target_tokens': LENGTH}
# 8 query / 4 kv heads, dims divisible by 8 so every preset splits them.
CONFIG = decoder.DecoderConfig(vocab_size=256, emb_dim=32, num_heads=8, num_kv_heads=4,
                               head_dim=8, mlp_dim=64, num_layers=2, scan_layers=True)
PRESETS = {
    'data_parallel': dict(data_parallelism=8),
    'fsdp': dict(data_parallelism=1, fsdp_parallelism=8),
    'tensor_parallel': dict(data_parallelism=2, tensor_parallelism=4),
    'fsdp_tp': dict(data_parallelism=1, fsdp_parallelism=4, tensor_parallelism=2),
}


def packed_prefix_lm_batch(batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch_size, LENGTH), np.int32)
  seg[:, :9], seg[:, 9:14] = 1, 2
  pos = np.zeros_like(seg)
  pos[:, :9], pos[:, 9:14] = np.arange(9), np.arange(5)
  tgt = rng.integers(3, 250, seg.shape).astype(np.int32) * (seg > 0)
  inp = np.where(pos == 0, 0, np.roll(tgt, 1, axis=1)) * (seg > 0)
  prefix = ((pos <= 3) & (seg > 0)).astype(np.int32)
  weights = ((seg > 0) & (prefix == 0)).astype(np.int32)
  return dict(decoder_input_tokens=inp, decoder_target_tokens=tgt, decoder_segment_ids=seg,
              decoder_positions=pos, decoder_causal_attention=prefix, decoder_loss_weights=weights)


def one_step(partitioner, config=CONFIG):
  model = decoder.DecoderOnlyModel(config=config)
  opt = optimizers.adamw(learning_rate=optax.constant_schedule(1e-3))
  layout = trainer.state_layout(model=model, optimizer=opt, partitioner=partitioner,
                                feature_lengths=FEATURE_LENGTHS)
  state = trainer.init_train_state(model=model, optimizer=opt, partitioner=partitioner,
                                   feature_lengths=FEATURE_LENGTHS, seed=0, layout=layout)
  batch = packed_prefix_lm_batch()
  step = trainer.jit_train_step(trainer.make_train_step(model=model, optimizer=opt),
                                partitioner=partitioner, layout=layout,
                                batch_feature_names=tuple(batch))
  state, metrics = step(state, partitioning.global_batch(batch, partitioner))
  return layout, state, jax.device_get(metrics)


@pytest.fixture(scope='module')
def reference():
  return one_step(partitioning.Partitioner(devices=jax.devices()[:1]))


# fsdp_tp covers both axes (and splits kv heads) by default; the single-axis
# presets repeat it on one axis each, so they run with -m slow.
@pytest.mark.parametrize('preset', [
    'data_parallel', 'fsdp_tp',
    pytest.param('fsdp', marks=pytest.mark.slow),
    pytest.param('tensor_parallel', marks=pytest.mark.slow)])
def test_decoder_step_is_the_same_under_every_preset(reference, preset):
  _, ref_state, ref_metrics = reference
  layout, state, metrics = one_step(partitioning.Partitioner(**PRESETS[preset]))
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], ref_metrics['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=2e-5, atol=2e-5),  # Adam: update ~1e-3, sign-normalised
               state.params, ref_state.params)
  specs = {str(s.spec) for s in jax.tree.leaves(layout.shardings.params)}
  key = layout.shardings.params['layers']['attention']['key']['kernel']
  if preset == 'tensor_parallel':  # kv heads really split over `model`
    assert key.spec == jax.sharding.PartitionSpec(None, None, 'model', None)
  if preset == 'fsdp_tp':
    assert key.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'model', None)
  if preset == 'fsdp':
    assert any('fsdp' in s for s in specs)


# configs/models/decoder_tiny.gin: 4 query heads, 2 kv heads.
TINY = decoder.DecoderConfig(vocab_size=8192, emb_dim=32, num_heads=4, num_kv_heads=2,
                             head_dim=8, mlp_dim=64, num_layers=2)


def test_tensor_parallel_over_more_devices_than_heads_replicates_heads():
  """configs/partitioning/tensor_parallel.gin (model = all 8 devices) with the tiny
  decoder: 4 query and 2 kv heads cannot be split 8 ways, so they are replicated
  across `model` (the MLP and vocabulary still split); the step equals 1 device's."""
  _, ref_state, ref_metrics = one_step(partitioning.Partitioner(devices=jax.devices()[:1]),
                                       TINY)
  part = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=1,
                                  tensor_parallelism=-1)
  layout, state, metrics = one_step(part, TINY)
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=2e-5, atol=2e-5),
               state.params, ref_state.params)
  attention = layout.shardings.params['layers_0']['attention']
  P = jax.sharding.PartitionSpec
  assert attention['key']['kernel'].spec == P(None, None, None)
  assert attention['query']['kernel'].spec == P(None, None, None)
  assert layout.shardings.params['layers_0']['mlp']['wi_0']['kernel'].spec == P(None, 'model')
  assert layout.shardings.params['logits_dense']['kernel'].spec == P(None, 'model')


def test_a_dimension_that_cannot_be_split_is_named_before_compiling():
  config = decoder.DecoderConfig(vocab_size=8192, emb_dim=32, num_heads=8, num_kv_heads=2,
                                 head_dim=8, mlp_dim=60, num_layers=1)
  part = partitioning.Partitioner(data_parallelism=1, tensor_parallelism=-1)
  with pytest.raises(ValueError) as e:
    trainer.state_layout(model=decoder.DecoderOnlyModel(config=config),
                         optimizer=optimizers.adamw(learning_rate=optax.constant_schedule(1e-3)),
                         partitioner=part, feature_lengths=FEATURE_LENGTHS)
  message = str(e.value)
  for part_of_message in ('layers_0/mlp/wi_0/kernel', "'mlp'", '60', "'model'", '8',
                          'tensor_parallelism'):
    assert part_of_message in message, message
