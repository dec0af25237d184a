"""LLaMA-style decoder: masks (causal, packed, prefix LM), scan/remat/attention
switches agree, bf16, gin sizes, and flat compile time with scanned layers."""

import dataclasses
import functools
import logging
import pathlib
import time

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import attention
from t5x_like.models import decoder
from t5x_like.models import layers


def decoder_attention_mask(tokens, segment_ids, causal_attention):
  """Reference rule (as in tests/test_data_objectives.py, without importing TF):
  causal, or both positions in the causal_attention region; never to/from
  padding (target 0); never across segments."""
  i, j = np.indices((len(tokens), len(tokens)))
  prefix = causal_attention > 0
  allowed = (j <= i) | (prefix[i] & prefix[j])
  allowed &= (tokens[i] > 0) & (tokens[j] > 0)
  return allowed & (segment_ids[i] == segment_ids[j])

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'models'
TINY = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                             mlp_dim=48, num_layers=2)
LENGTH = 12


@functools.lru_cache(maxsize=None)
def _params(config=TINY, seed=0):
  init = functools.partial(decoder.DecoderOnlyModel(config=config).init_params, batch_size=1,
                           decoder_length=4)
  return nn.unbox(jax.jit(init)(jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def _forward(config):
  return jax.jit(lambda p, kw: decoder.Decoder(config=config).apply(
      {'params': p}, enable_dropout=False, **kw))


def _logits(config, params, **features):
  return np.asarray(_forward(config)(params, {k: jnp.asarray(v) for k, v in features.items()}))


def _packed_row():
  """One row: segment 1 (5 tokens, prefix 3), segment 2 (4 tokens, prefix 2), 3 pad."""
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]], np.int32)
  tgt = rng.integers(3, 64, (1, LENGTH)).astype(np.int32) * (seg > 0)
  inp = np.where(pos == 0, 0, np.roll(tgt, 1, axis=1)) * (seg > 0)
  prefix = np.array([[1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]], np.int32)
  return dict(decoder_input_tokens=inp, decoder_target_tokens=tgt, decoder_segment_ids=seg,
              decoder_positions=pos, decoder_causal_attention=prefix,
              decoder_loss_weights=(seg > 0).astype(np.int32))


def test_mask_matches_the_reference_prefix_lm_rule():
  b = _packed_row()
  ours = attention.dense_mask(q_len=LENGTH, k_len=LENGTH, causal=True,
                              q_segment_ids=jnp.asarray(b['decoder_segment_ids']),
                              kv_segment_ids=jnp.asarray(b['decoder_segment_ids']),
                              prefix_BxL=jnp.asarray(b['decoder_causal_attention']))[0, 0]
  ref = decoder_attention_mask(b['decoder_target_tokens'][0], b['decoder_segment_ids'][0],
                               b['decoder_causal_attention'][0])
  np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize('prefix_lm', [False, True])
def test_packed_row_equals_sequences_run_alone(prefix_lm):
  params, b = _params(), _packed_row()
  feats = {k: b[k] for k in ('decoder_input_tokens', 'decoder_segment_ids', 'decoder_positions')}
  if prefix_lm:
    feats['decoder_causal_attention'] = b['decoder_causal_attention']
  packed = _logits(TINY, params, **feats)
  for lo, hi in ((0, 5), (5, 9)):
    alone = {'decoder_input_tokens': b['decoder_input_tokens'][:, lo:hi]}
    if prefix_lm:
      alone['decoder_causal_attention'] = b['decoder_causal_attention'][:, lo:hi]
    np.testing.assert_allclose(packed[:, lo:hi], _logits(TINY, params, **alone), atol=2e-5)


def test_causal_future_tokens_do_not_leak_but_prefix_is_bidirectional():
  params, b = _params(), _packed_row()
  tokens = b['decoder_input_tokens'][:, :5]
  changed = tokens.copy()
  changed[0, 2] = (changed[0, 2] + 1) % 64
  prefix = b['decoder_causal_attention'][:, :5]
  base, moved = _logits(TINY, params, decoder_input_tokens=tokens), _logits(
      TINY, params, decoder_input_tokens=changed)
  np.testing.assert_allclose(base[:, :2], moved[:, :2], atol=1e-6)   # causal: 0,1 blind to 2
  base_p = _logits(TINY, params, decoder_input_tokens=tokens, decoder_causal_attention=prefix)
  moved_p = _logits(TINY, params, decoder_input_tokens=changed, decoder_causal_attention=prefix)
  assert np.abs(base_p[:, :2] - moved_p[:, :2]).max() > 1e-3        # prefix: they see it


@pytest.mark.parametrize('impl', ['jax_xla', 'cudnn', 'splash'])
def test_attention_implementations_agree_or_fall_back(impl, caplog):
  """jax.nn.dot_product_attention('xla') equals our einsum on packed + prefix
  masks; cudnn/splash on CPU fall back to xla with a logged reason."""
  params, b = _params(), _packed_row()
  feats = {k: v for k, v in b.items() if not k.startswith('decoder_target')
           and k != 'decoder_loss_weights'}
  ref = _logits(TINY, params, **feats)
  attention._warned.clear()
  with caplog.at_level(logging.WARNING):
    other = _logits(dataclasses.replace(TINY, attention_impl=impl), params, **feats)
  np.testing.assert_allclose(other, ref, atol=2e-5)
  if impl != 'jax_xla':
    assert 'falling back to xla' in caplog.text


def test_fused_choice_is_kept_when_the_backend_has_it():
  choose = functools.partial(attention.choose_implementation, has_bias=False, has_prefix=False,
                             dropout=False)
  assert choose('cudnn', dtype=jnp.bfloat16, backend='gpu') == 'cudnn'
  assert choose('cudnn', dtype=jnp.float32, backend='gpu') == 'xla'
  assert choose('splash', dtype=jnp.bfloat16, backend='tpu') == 'splash'
  assert choose('splash', dtype=jnp.bfloat16, backend='tpu', has_bias=True) == 'xla'
  assert attention.choose_implementation('cudnn', dtype=jnp.bfloat16, backend='gpu',
                                         has_bias=True, has_prefix=True, dropout=True) == 'xla'


def test_scanned_and_unscanned_give_the_same_loss_and_grads():
  b = _packed_row()
  flat = _params()
  scan_cfg = dataclasses.replace(TINY, scan_layers=True, remat_policy='save_dots')
  scanned = layers.scan_params(flat, TINY.num_layers)
  jax.tree.map(np.testing.assert_array_equal, layers.unscan_params(scanned, TINY.num_layers), flat)
  # The scanned init really has a leading 'layers' axis named for partitioning.
  boxed = jax.eval_shape(functools.partial(decoder.DecoderOnlyModel(config=scan_cfg).init_params,
                                           batch_size=1, decoder_length=4), jax.random.key(0))
  assert nn.get_partition_spec(boxed)['layers']['mlp']['wi_0']['kernel'] == \
      jax.sharding.PartitionSpec('layers', 'embed', 'mlp')
  grad = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p: decoder.DecoderOnlyModel(config=cfg).loss_and_metrics(p, b, dropout_rng=None)[0]))
  loss_a, grads_a = grad(TINY)(flat)
  loss_b, grads_b = grad(scan_cfg)(scanned)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               layers.scan_params(grads_a, TINY.num_layers), grads_b)


@pytest.mark.parametrize('policy', ['full', 'save_dots_no_batch'])
def test_remat_policies_do_not_change_gradients(policy):
  b, params = _packed_row(), _params()
  grad = lambda cfg: jax.jit(jax.grad(
      lambda p: decoder.DecoderOnlyModel(config=cfg).loss_and_metrics(p, b, dropout_rng=None)[0]))
  ref = grad(TINY)(params)
  got = grad(dataclasses.replace(TINY, remat_policy=policy))(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), ref, got)


def test_bf16_compute_keeps_float32_params_and_logits_close():
  b, params = _packed_row(), _params()
  f32 = _logits(TINY, params, decoder_input_tokens=b['decoder_input_tokens'])
  bf16 = _logits(dataclasses.replace(TINY, dtype='bfloat16'), params,
                 decoder_input_tokens=b['decoder_input_tokens'])
  assert bf16.dtype == np.float32
  assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_tied_embeddings_have_no_output_layer():
  cfg = dataclasses.replace(TINY, tie_embeddings=True)
  shapes = jax.eval_shape(functools.partial(decoder.DecoderOnlyModel(config=cfg).init_params,
                                            batch_size=1, decoder_length=4), jax.random.key(0))
  assert 'logits_dense' not in shapes


def test_loss_metrics_and_normalizations():
  b, params = _packed_row(), _params()
  sums = {}
  for norm in ('tokens', 'total_tokens', 'sequences'):
    model = decoder.DecoderOnlyModel(config=TINY, loss_normalization=norm)
    loss, m = jax.jit(model.loss_and_metrics)(params, b, dropout_rng=None)
    sums[norm] = m
    assert loss == m['loss_sum']                 # a sum: the trainer divides once
  assert float(sums['tokens']['weight_sum']) == 9
  assert float(sums['total_tokens']['weight_sum']) == LENGTH
  assert float(sums['sequences']['weight_sum']) == 2
  np.testing.assert_allclose(sums['tokens']['loss_sum'], sums['total_tokens']['loss_sum'], rtol=1e-6)


def _param_count(gin_file):
  gin.clear_config()
  gin.parse_config_file(str(CONFIG_DIR / gin_file))
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  gin.clear_config()
  shapes = jax.eval_shape(functools.partial(model.init_params, batch_size=1, decoder_length=8),
                          jax.random.key(0))
  return model, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize('gin_file,expected', [
    ('decoder_tiny.gin', None),
    ('decoder_125m.gin', 134_105_856),
    ('decoder_llama3_2_1b.gin', 1_235_814_400),   # published: 1.24B
    ('decoder_llama2_7b.gin', 6_738_415_616),     # published: 6.74B
])
def test_gin_sizes(gin_file, expected):
  model, count = _param_count(gin_file)
  assert isinstance(model, decoder.DecoderOnlyModel)
  if expected:
    assert count == expected


def _compile_seconds(num_layers):
  cfg = dataclasses.replace(TINY, num_layers=num_layers, scan_layers=True, remat_policy='full')
  model = decoder.DecoderOnlyModel(config=cfg)
  b = _packed_row()
  abstract = jax.eval_shape(functools.partial(model.init_params, batch_size=1, decoder_length=4),
                            jax.random.key(0))
  lowered = jax.jit(jax.grad(lambda p: model.loss_and_metrics(p, b, dropout_rng=None)[0])).lower(
      nn.unbox(abstract))
  start = time.perf_counter()
  lowered.compile()
  return time.perf_counter() - start


def test_scanned_compile_time_is_flat_in_depth():
  # Warm the in-process caches on another depth: the session's persistent compilation
  # cache (conftest.py) would hand back a depth compiled before without compiling it.
  _compile_seconds(4)
  two, eight = _compile_seconds(2), _compile_seconds(8)
  print(f'scanned grad compile: 2 layers {two:.2f}s, 8 layers {eight:.2f}s')
  assert eight < 2 * two, (two, eight)
