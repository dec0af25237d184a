"""T5.1.1 encoder-decoder: masks, packing, causality, init, sizes, partitioning."""

import dataclasses
import functools
import math
import pathlib
import typing

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import t5_layers
from t5x_like.models import losses
from t5x_like.models import t5

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'models'

TINY = t5.T5Config(
    vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
    num_encoder_layers=2, num_decoder_layers=2,
)
# For tests about one code path (dtype, tied logits, dropout): less to compile.
SHALLOW = dataclasses.replace(TINY, num_encoder_layers=1, num_decoder_layers=1)


# Compiles dominate this file's run time: share jitted functions and shapes.
ENC_LEN, DEC_LEN = 12, 8


@functools.lru_cache(maxsize=None)
def _params(config: t5.T5Config = TINY, seed: int = 0):
  if config.num_encoder_layers == 1 and config.num_decoder_layers == 1 and config.vocab_size == 64:
    # Init compiles are slow on CPU (RNG): cut SHALLOW-like params out of TINY's.
    params = jax.tree.map(lambda x: x, _params(TINY, seed))
    for stack in ('encoder', 'decoder'):
      del params[stack]['layers_1']
    if config.logits_via_embedding:
      del params['decoder']['logits_dense']
    return params
  model = t5.EncoderDecoderModel(config=config)
  init = functools.partial(model.init_params, batch_size=1, encoder_length=4, decoder_length=4)
  key = jax.random.key(seed)
  # Low backend optimisation: init runs once, and RNG-heavy code compiles ~3x faster.
  compiled = jax.jit(init).lower(key).compile(compiler_options={'xla_backend_optimization_level': 0})
  return nn.unbox(compiled(key))


@functools.lru_cache(maxsize=None)
def _forward(config):
  module = t5.Transformer(config=config)
  return jax.jit(lambda p, e, d, kw: module.apply({'params': p}, e, d, enable_dropout=False, **kw))


def _logits(config, params, enc, dec, **kw):
  kw = {k: jnp.asarray(v) for k, v in kw.items()}
  return np.asarray(_forward(config)(params, jnp.asarray(enc), jnp.asarray(dec), kw))


@functools.lru_cache(maxsize=None)
def _loss_fn(model):
  return jax.jit(model.loss_and_metrics)


def _random_tokens(rng, shape, vocab=TINY.vocab_size):
  return rng.integers(3, vocab, size=shape).astype(np.int32)


# ---------------------------------------------------------------------------
# Forward pass basics


def test_logits_shape_dtype_and_bf16_close_to_f32():
  rng = np.random.default_rng(0)
  enc, dec = _random_tokens(rng, (1, ENC_LEN)), _random_tokens(rng, (1, DEC_LEN))
  params = _params(SHALLOW)
  f32 = _logits(SHALLOW, params, enc, dec)
  assert f32.shape == (1, DEC_LEN, TINY.vocab_size) and f32.dtype == np.float32
  assert np.all(np.isfinite(f32))
  bf16 = _logits(dataclasses.replace(SHALLOW, dtype='bfloat16'), params, enc, dec)
  assert bf16.dtype == np.float32  # Logits are float32 whatever the compute dtype.
  diff = np.abs(bf16 - f32)
  assert diff.max() > 1e-6, 'bf16 path gave f32-identical logits: is it computing in bf16?'
  assert diff.mean() < 0.05 * f32.std(), (diff.mean(), f32.std())
  assert np.corrcoef(bf16.ravel(), f32.ravel())[0, 1] > 0.995


def test_tied_logits_variant():
  config = dataclasses.replace(SHALLOW, logits_via_embedding=True)
  params = _params(config)
  assert 'logits_dense' not in params['decoder']
  rng = np.random.default_rng(0)
  enc, dec = _random_tokens(rng, (1, ENC_LEN)), _random_tokens(rng, (1, DEC_LEN))
  # Tied logits are the final decoder activations times the embedding table,
  # scaled by emb_dim**-0.5.
  module = t5.Transformer(config=config)
  got, state = jax.jit(
      lambda p, e, d: module.apply(
          {'params': p}, e, d, enable_dropout=False,
          capture_intermediates=lambda mdl, _: mdl.name == 'decoder_norm',
      )
  )(params, enc, dec)
  got = np.asarray(got)
  y = np.asarray(state['intermediates']['decoder']['decoder_norm']['__call__'][0])
  table = np.asarray(params['token_embedder']['embedding'])
  np.testing.assert_allclose(got, y @ table.T * config.emb_dim**-0.5, atol=1e-5, rtol=1e-5)
  assert got.shape == (1, DEC_LEN, config.vocab_size)


# ---------------------------------------------------------------------------
# Masks


def test_packed_examples_match_running_each_alone():
  rng = np.random.default_rng(1)
  params = _params()
  enc_len, dec_len = ENC_LEN, DEC_LEN
  # Example A: 5 input tokens, 3 decoder tokens; example B: 4 and 4.
  a_enc, b_enc = _random_tokens(rng, 5), _random_tokens(rng, 4)
  a_dec = np.concatenate([[0], _random_tokens(rng, 2)]).astype(np.int32)  # 0 = BOS
  b_dec = np.concatenate([[0], _random_tokens(rng, 3)]).astype(np.int32)

  def pad(x, n):
    return np.pad(x, (0, n - len(x)))[None].astype(np.int32)

  packed = dict(
      enc=pad(np.concatenate([a_enc, b_enc]), enc_len),
      dec=pad(np.concatenate([a_dec, b_dec]), dec_len),
      encoder_segment_ids=pad([1] * 5 + [2] * 4, enc_len),
      decoder_segment_ids=pad([1] * 3 + [2] * 4, dec_len),
      encoder_positions=pad(list(range(5)) + list(range(4)), enc_len),
      decoder_positions=pad(list(range(3)) + list(range(4)), dec_len),
  )
  enc, dec = packed.pop('enc'), packed.pop('dec')
  packed_logits = _logits(TINY, params, enc, dec, **packed)[0]
  a_alone = _logits(TINY, params, pad(a_enc, enc_len), pad(a_dec, dec_len))[0]
  b_alone = _logits(TINY, params, pad(b_enc, enc_len), pad(b_dec, dec_len))[0]
  np.testing.assert_allclose(packed_logits[:3], a_alone[:3], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed_logits[3:7], b_alone[:4], atol=1e-5, rtol=0)
  # Sanity: the two examples do give different logits (the test can fail).
  assert np.abs(a_alone[:3] - b_alone[:3]).max() > 1e-2


def test_decoder_is_causal_and_encoder_is_bidirectional():
  rng = np.random.default_rng(2)
  params = _params()
  enc, dec = _random_tokens(rng, (1, ENC_LEN)), _random_tokens(rng, (1, DEC_LEN))
  base = _logits(TINY, params, enc, dec)
  t = 3
  dec2 = dec.copy()
  dec2[0, t] = (dec[0, t] + 1 - 3) % (TINY.vocab_size - 3) + 3
  changed = _logits(TINY, params, enc, dec2)
  np.testing.assert_array_equal(changed[:, :t], base[:, :t])
  assert np.abs(changed[:, t:] - base[:, t:]).max(axis=-1).min() > 1e-4

  # Changing the last encoder token changes every decoder position, and the
  # encoding of the first encoder position (attention looks both ways).
  enc2 = enc.copy()
  enc2[0, -1] = (enc[0, -1] + 1 - 3) % (TINY.vocab_size - 3) + 3
  changed = _logits(TINY, params, enc2, dec)
  assert np.abs(changed - base).max(axis=-1).min() > 1e-4
  module = t5.Transformer(config=TINY)
  encode = lambda e: module.apply({'params': params}, jnp.asarray(e), enable_dropout=False, method='encode')
  assert float(jnp.abs(encode(enc2)[0, 0] - encode(enc)[0, 0]).max()) > 1e-4


def _reference_bucket(rel, bidirectional, num_buckets, max_distance):
  """Straight transcription of the T5 bucketing description, one scalar at a time."""
  n = -rel
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      offset = num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return offset + n
  large = max_exact + int(
      math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  )
  return offset + min(large, num_buckets - 1)


@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64), (8, 20)])
@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_bucket_matches_reference(num_buckets, max_distance, bidirectional):
  rel = np.arange(-400, 401)
  got = np.asarray(
      t5_layers.relative_position_bucket(
          jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
      )
  )
  want = [_reference_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
  np.testing.assert_array_equal(got, want)
  assert got.min() >= 0 and got.max() == num_buckets - 1


def test_relative_position_bucket_known_values():
  b = lambda r, bi: int(t5_layers.relative_position_bucket(jnp.asarray(r), bidirectional=bi))
  # Encoder: keys before the query use buckets 0..15, keys after it 16..31.
  assert [b(0, True), b(-1, True), b(1, True), b(-7, True), b(-8, True)] == [0, 1, 17, 7, 8]
  assert b(-1000, True) == 15 and b(1000, True) == 31
  # Decoder: future keys share bucket 0; exact up to distance 15; then log-spaced.
  assert [b(5, False), b(-15, False), b(-16, False), b(-127, False), b(-128, False)] == [0, 15, 16, 31, 31]


class _SharedBias(typing.NamedTuple):
  """The bias looked up once per stack and shared by its layers (the reference)."""
  bias_1xHxQxK: jax.Array

  def dense(self):
    return self.bias_1xHxQxK


def test_each_layer_looking_up_the_relative_bias_changes_only_its_tables_rounding(monkeypatch):
  """Per-layer look-ups (t5_layers.RelativeBias) against one bias shared by the
  layers: the loss and every gradient bit for bit, except the two bias tables',
  whose sums over layers are added in another order (within 1e-5 of the largest
  element; observed 3e-6 on a 4-layer encoder)."""
  rng = np.random.default_rng(5)
  config = dataclasses.replace(TINY, num_encoder_layers=4)
  model = t5.EncoderDecoderModel(config=config)
  params = nn.unbox(model.init_params(jax.random.key(0), batch_size=1, encoder_length=32,
                                      decoder_length=DEC_LEN))
  batch = _batch(rng, 2, 32, DEC_LEN)
  loss = lambda p: model.loss_and_metrics(p, batch, dropout_rng=None)[0]
  ours = jax.jit(jax.value_and_grad(loss))(params)
  looked_up_per_layer = t5._relpos_bias
  monkeypatch.setattr(t5, '_relpos_bias',
                      lambda *a, **kw: _SharedBias(looked_up_per_layer(*a, **kw).dense()))
  shared = jax.jit(jax.value_and_grad(loss))(params)
  assert float(ours[0]) == float(shared[0])
  tables = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours[1]), jax.tree.leaves(shared[1])):
    path = jax.tree_util.keystr(path)
    if 'relpos_bias' in path:
      tables += 1
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.max(np.abs(b))), err_msg=path)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)
  assert tables == 2


# ---------------------------------------------------------------------------
# Loss wrapper


def _batch(rng, b, le, ld):
  return dict(
      encoder_input_tokens=_random_tokens(rng, (b, le)),
      decoder_input_tokens=_random_tokens(rng, (b, ld)),
      decoder_target_tokens=_random_tokens(rng, (b, ld)),
      decoder_loss_weights=np.ones((b, ld), np.int32),
  )


def test_loss_and_metrics_ignore_padding():
  rng = np.random.default_rng(3)
  model = t5.EncoderDecoderModel(config=TINY, z_loss=1e-4, label_smoothing=0.1)
  params = _params()
  batch = _batch(rng, 2, ENC_LEN - 4, DEC_LEN - 3)
  padded = {k: np.pad(v, ((0, 0), (0, 4 if k.startswith('encoder') else 3))) for k, v in batch.items()}
  loss_fn = _loss_fn(model)
  loss, metrics = loss_fn(params, batch, dropout_rng=None)
  ploss, pmetrics = loss_fn(params, padded, dropout_rng=None)
  np.testing.assert_allclose(float(ploss), float(loss), rtol=1e-5)
  assert float(pmetrics['weight_sum']) == float(metrics['weight_sum']) == 10.0
  assert float(loss) == float(metrics['loss_sum'])       # a sum: the trainer divides once
  assert 0 <= float(metrics['accuracy_sum']) <= 10.0
  assert 0 < float(metrics['z_loss_sum']) < float(metrics['loss_sum'])
  # Loss near log(vocab) at init (output std ~1 adds about 0.5 nats), less the
  # label-smoothing entropy that is subtracted so the minimum is 0.
  expected = math.log(TINY.vocab_size) - losses.label_smoothing_constant(vocab_size=64, label_smoothing=0.1)
  assert expected - 0.5 < float(loss) / 10.0 < expected + 1.5


def test_dropout_uses_the_rng():
  config = dataclasses.replace(SHALLOW, dropout_rate=0.3)
  model = t5.EncoderDecoderModel(config=config)
  params = _params(SHALLOW)
  batch = _batch(np.random.default_rng(4), 2, ENC_LEN, DEC_LEN)
  # RNG-heavy: compile with low backend optimisation (about 3x faster on CPU).
  loss_fn = (
      jax.jit(lambda p, b, r: model.loss_and_metrics(p, b, dropout_rng=r))
      .lower(params, batch, jax.random.key(0))
      .compile(compiler_options={'xla_backend_optimization_level': 0})
  )
  on1, _ = loss_fn(params, batch, jax.random.key(1))
  on1b, _ = loss_fn(params, batch, jax.random.key(1))
  on2, _ = loss_fn(params, batch, jax.random.key(2))
  assert float(on1) == float(on1b)
  assert abs(float(on1) - float(on2)) > 1e-4  # Different masks: dropout is active.


def test_gradients_are_finite_reach_every_param_and_fit_a_batch():
  model = t5.EncoderDecoderModel(config=TINY)
  batch = _batch(np.random.default_rng(5), 2, ENC_LEN, DEC_LEN)
  step = jax.jit(jax.value_and_grad(lambda p: model.loss_and_metrics(p, batch, dropout_rng=None)[0]))
  params = _params()
  first_loss, grads = step(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert float(jnp.abs(g).max()) > 0, path
  # A few SGD steps on one batch must lower the loss a lot (the model can learn).
  for _ in range(15):
    loss, grads = step(params)
    # Step 0.5 on the mean token loss; the model's loss is the sum over 2 x DEC_LEN.
    params = jax.tree.map(lambda p, g: p - 0.5 / (2 * DEC_LEN) * g, params, grads)
  assert float(loss) < 0.7 * float(first_loss), (float(first_loss), float(loss))


# ---------------------------------------------------------------------------
# Initialisation


def test_init_statistics_follow_t5():
  config = t5.T5Config(
      vocab_size=512, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=512,
      num_encoder_layers=1, num_decoder_layers=1,
  )
  params = _params(config, seed=7)
  d, h, k, m = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim
  attn = {'query': (d * k) ** -0.5, 'key': d**-0.5, 'value': d**-0.5, 'out': (h * k) ** -0.5}
  mlp = {'wi_0': d**-0.5, 'wi_1': d**-0.5, 'wo': m**-0.5}
  targets = {('token_embedder', 'embedding'): 1.0, ('decoder', 'logits_dense', 'kernel'): d**-0.5}
  for stack, blocks in [('encoder', ['attention']), ('decoder', ['self_attention', 'encoder_decoder_attention'])]:
    for block in blocks:
      for name, std in attn.items():
        targets[(stack, 'layers_0', block, name, 'kernel')] = std
    for name, std in mlp.items():
      targets[(stack, 'layers_0', 'mlp', name, 'kernel')] = std
  for path, std in targets.items():
    leaf = functools.reduce(lambda t, key: t[key], path, params)
    assert abs(float(jnp.std(leaf)) / std - 1) < 0.1, (path, float(jnp.std(leaf)), std)
    assert abs(float(jnp.mean(leaf))) < 0.1 * std, path
  assert float(jnp.std(params['encoder']['layers_0']['pre_mlp_layer_norm']['scale'])) == 0.0
  assert float(params['encoder']['encoder_norm']['scale'][0]) == 1.0
  # Truncated at two standard deviations (documented choice for dense kernels).
  wo = params['encoder']['layers_0']['mlp']['wo']['kernel']
  assert float(jnp.abs(wo).max()) <= 2 * m**-0.5 / 0.8796 + 1e-6


# ---------------------------------------------------------------------------
# Gin configs: parse, build, count, partition


def _model_from_gin(name):
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(CONFIG_DIR / f't5_1_1_{name}.gin')], None)
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()
  return model


def _abstract_params(model):
  init = functools.partial(model.init_params, batch_size=1, encoder_length=8, decoder_length=8)
  return jax.eval_shape(init, jax.random.key(0))


def _analytic_count(c: t5.T5Config) -> int:
  attn = 4 * c.emb_dim * c.num_heads * c.head_dim
  mlp = 3 * c.emb_dim * c.mlp_dim
  enc_layer = attn + mlp + 2 * c.emb_dim
  dec_layer = 2 * attn + mlp + 3 * c.emb_dim
  relpos = c.relative_attention_num_buckets * c.num_heads
  embeddings = c.vocab_size * c.emb_dim * (1 if c.logits_via_embedding else 2)
  return (
      embeddings + c.num_encoder_layers * enc_layer + c.num_decoder_layers * dec_layer
      + 2 * relpos + 2 * c.emb_dim
  )


# Published T5.1.1 sizes. XXL: its dims give 11.14B (the "11B" model); the 11.3B
# sometimes quoted does not follow from d_model 4096 / d_ff 10240 / 64 heads.
PUBLISHED = {'small': 77e6, 'base': 248e6, 'large': 783e6, 'xl': 2.85e9, 'xxl': 11.14e9}
EXACT = {
    'tiny': 573_952, 'cpu': 11_276_800, 'small': 76_961_152, 'base': 247_577_856,
    'large': 783_150_080, 'xl': 2_849_757_184, 'xxl': 11_135_332_352,
}


@pytest.mark.parametrize('name', list(EXACT))
def test_gin_config_builds_and_has_the_published_size(name):
  model = _model_from_gin(name)
  assert isinstance(model, t5.EncoderDecoderModel)
  count = sum(x.size for x in jax.tree.leaves(_abstract_params(model)))
  assert count == EXACT[name] == _analytic_count(model.config)
  if name in PUBLISHED:
    assert abs(count / PUBLISHED[name] - 1) < 0.01
    assert model.config.vocab_size == 32128 and model.config.head_dim == 64


def test_every_param_has_a_logical_spec_of_its_rank():
  abstract = _abstract_params(_model_from_gin('tiny'))
  specs = nn.get_partition_spec(abstract)
  known = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'relpos_buckets'}
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  leaves = jax.tree.leaves(nn.unbox(abstract))
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  assert len(leaves) == len(spec_leaves) > 0
  for leaf, spec in zip(leaves, spec_leaves):
    assert is_spec(spec) and len(spec) == leaf.ndim and set(spec) <= known, (leaf.shape, spec)
  assert specs['token_embedder']['embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
  assert specs['decoder']['logits_dense']['kernel'] == jax.sharding.PartitionSpec('embed', 'vocab')
  assert specs['encoder']['layers_1']['attention']['out']['kernel'] == jax.sharding.PartitionSpec(
      'heads', 'kv', 'embed'
  )


def test_runs_under_a_mesh_with_logical_rules():
  mesh = jax.sharding.Mesh(
      np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'model'),
      axis_types=(jax.sharding.AxisType.Auto,) * 3,
  )
  rules = [('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'model'), ('heads', 'model'),
           ('vocab', 'model'), ('length', None), ('kv', None), ('relpos_buckets', None)]
  rng = np.random.default_rng(6)
  enc, dec = _random_tokens(rng, (1, ENC_LEN)), _random_tokens(rng, (1, DEC_LEN))
  want = _logits(TINY, _params(), enc, dec)
  module = t5.Transformer(config=TINY)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # A fresh jit: the rules are read at trace time.
    forward = jax.jit(lambda p, e, d: module.apply({'params': p}, e, d, enable_dropout=False))
    text = forward.lower(_params(), enc, dec).as_text()
    got = np.asarray(forward(_params(), enc, dec))
  assert 'sharding' in text  # The logical constraints became sharding annotations.
  np.testing.assert_allclose(got, want, atol=1e-6)
