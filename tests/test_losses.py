"""cross_entropy_with_z_loss against an independent numpy reference."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.models import losses


def _reference(logits, targets, weights, *, z_loss, label_smoothing):
  """KL(smoothed target || softmax) + z_loss * logZ^2, per token, weighted."""
  logits = logits.astype(np.float64)
  vocab = logits.shape[-1]
  m = logits.max(-1, keepdims=True)
  log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  logp = logits - log_z[..., None]
  soft = np.full(logits.shape, label_smoothing / (vocab - 1))
  np.put_along_axis(soft, targets[..., None], 1.0 - label_smoothing, axis=-1)
  with np.errstate(divide='ignore', invalid='ignore'):
    plogp = np.where(soft > 0, soft * np.log(soft), 0.0)
  kl = (plogp - soft * logp).sum(-1)
  z = z_loss * log_z**2
  return (kl + z) * weights, z * weights


@pytest.mark.parametrize('z_loss,label_smoothing', [(0.0, 0.0), (1e-4, 0.0), (0.0, 0.1), (1e-2, 0.2)])
def test_matches_numpy_reference(z_loss, label_smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3 + 2
  targets = rng.integers(0, 11, size=(3, 5))
  weights = rng.integers(0, 2, size=(3, 5)).astype(np.float32)
  total, z = losses.cross_entropy_with_z_loss(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
      z_loss=z_loss, label_smoothing=label_smoothing,
  )
  ref_total, ref_z = _reference(logits, targets, weights, z_loss=z_loss, label_smoothing=label_smoothing)
  np.testing.assert_allclose(np.asarray(total), ref_total, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5, atol=1e-7)


def test_plain_cross_entropy_value():
  # Two-way softmax with logits (0, log 3): p(target=1) = 3/4.
  logits = jnp.asarray([[[0.0, np.log(3.0)]]], jnp.float32)
  total, z = losses.cross_entropy_with_z_loss(
      logits, jnp.asarray([[1]]), None, z_loss=0.5, label_smoothing=0.0
  )
  np.testing.assert_allclose(float(total[0, 0]), -np.log(0.75) + 0.5 * np.log(4.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(float(z[0, 0]), 0.5 * np.log(4.0) ** 2, rtol=1e-6)


def test_label_smoothing_minimum_is_zero():
  vocab, ls = 7, 0.3
  soft = np.full((1, 1, vocab), ls / (vocab - 1))
  soft[0, 0, 4] = 1 - ls
  total, _ = losses.cross_entropy_with_z_loss(
      jnp.asarray(np.log(soft), jnp.float32), jnp.asarray([[4]]), None, z_loss=0.0, label_smoothing=ls
  )
  assert abs(float(total[0, 0])) < 1e-5
  # ... and any other prediction costs more.
  other, _ = losses.cross_entropy_with_z_loss(
      jnp.zeros((1, 1, vocab)), jnp.asarray([[4]]), None, z_loss=0.0, label_smoothing=ls
  )
  assert float(other[0, 0]) > 0.1


def test_zero_weight_padding_does_not_change_the_sum():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
  targets = rng.integers(1, 9, size=(2, 4))
  weights = np.ones((2, 4), np.float32)
  padded_logits = np.concatenate([logits, rng.normal(size=(2, 3, 9)).astype(np.float32) * 50], axis=1)
  padded_targets = np.concatenate([targets, np.zeros((2, 3), int)], axis=1)
  padded_weights = np.concatenate([weights, np.zeros((2, 3), np.float32)], axis=1)
  kw = dict(z_loss=1e-4, label_smoothing=0.1)
  total, _ = losses.cross_entropy_with_z_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), **kw)
  ptotal, _ = losses.cross_entropy_with_z_loss(
      jnp.asarray(padded_logits), jnp.asarray(padded_targets), jnp.asarray(padded_weights), **kw
  )
  np.testing.assert_allclose(float(jnp.sum(ptotal)), float(jnp.sum(total)), rtol=1e-6)


# --------------------------------------------------------------------------- one normalisation

def _padded_t5_batch():
  """4 rows of a tiny T5's batch whose targets end in 1..6 padding positions, so the
  two halves (microbatches) hold different numbers of real tokens (5+4 vs 3+2)."""
  from t5x_like.models import t5
  model = t5.EncoderDecoderModel(config=t5.T5Config(
      vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=1, num_decoder_layers=1), z_loss=1e-2)
  rng = np.random.default_rng(0)
  real = np.arange(7)[None, :] < np.array([[5], [4], [3], [2]])
  targets = rng.integers(2, 40, (4, 7)).astype(np.int32) * real
  batch = {'encoder_input_tokens': rng.integers(2, 40, (4, 6)).astype(np.int32),
           'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           'decoder_target_tokens': targets, 'decoder_loss_weights': real.astype(np.int32)}
  return model, batch


def _numpy_loss_sum(logits, batch, z_loss):
  """Sum over real target tokens of -log p(target) + z_loss * logZ^2, in float64."""
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits).sum(-1))
  target_logit = np.take_along_axis(logits, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  per_token = log_z - target_logit + z_loss * log_z**2
  return float((per_token * batch['decoder_loss_weights']).sum())


def test_the_model_returns_the_loss_sum_and_the_trainer_divides_it_once():
  """The model's loss is the sum over real tokens (numpy, from its logits); the
  trainer's reported loss is that sum over the token count, with 1 or 2 microbatches."""
  import jax
  import flax.linen as nn
  from t5x_like.training import optimizers, trainer
  model, batch = _padded_t5_batch()
  params = nn.unbox(model.init_params(jax.random.key(0), batch_size=1, encoder_length=6,
                                      decoder_length=7))
  want = _numpy_loss_sum(model.logits(params, batch), batch, model.z_loss)
  loss, sums = model.loss_and_metrics(params, batch, dropout_rng=None)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(sums['loss_sum']), want, rtol=1e-6)
  assert float(sums['weight_sum']) == 14
  optimizer = optimizers.adamw(learning_rate=lambda step: 1e-3)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.transform.init(params))
  for num_microbatches in (1, 2):
    step = jax.jit(trainer.make_train_step(model=model, optimizer=optimizer,
                                           num_microbatches=num_microbatches))
    _, metrics = step(state, batch)
    assert float(metrics['target_tokens']) == 14
    np.testing.assert_allclose(float(metrics['loss']), want / 14, rtol=1e-6)


# --------------------------------------------------------------------------- what the gradient holds

def _take_along_axis(logits, targets):
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def test_pick_targets_gradient_is_autodiffs_of_take_along_axis():
  """g at each target, 0 elsewhere, bit for bit; the forward is the gather itself."""
  import jax
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(3, 4, 17)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, 17, (3, 4)).astype(np.int32))
  g = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  ours, vjp = jax.vjp(lambda x: losses.pick_targets(x, targets), logits)
  plain, plain_vjp = jax.vjp(lambda x: _take_along_axis(x, targets), logits)
  np.testing.assert_array_equal(ours, plain)
  np.testing.assert_array_equal(vjp(g)[0], plain_vjp(g)[0])


def _unflattened_sums(logits_BxLxV, targets_BxL, weights_BxL, *, z_loss, label_smoothing):
  """The loss as it was before the tokens were flattened and the gather given its
  own gradient: the reference the flattened one must equal."""
  token_w, weight_sum = losses.normalized_weights(weights_BxL, segment_ids_BxL=None,
                                                  normalization='tokens')
  loss_BxL, z_BxL = losses.cross_entropy_with_z_loss(
      logits_BxLxV, targets_BxL, token_w, z_loss=z_loss, label_smoothing=label_smoothing)
  correct = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  return jnp.sum(loss_BxL), {'loss_sum': jnp.sum(loss_BxL), 'z_loss_sum': jnp.sum(z_BxL),
                             'accuracy_sum': jnp.sum(correct * token_w),
                             'weight_sum': weight_sum}


def _loss_case():
  rng = np.random.default_rng(3)
  b, l, d, v = 4, 32, 64, 1000
  hidden = jnp.asarray(rng.normal(size=(b, l, d)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(d, v)).astype(np.float32) * d**-0.5)
  targets = jnp.asarray(rng.integers(0, v, (b, l)).astype(np.int32))
  weights = jnp.asarray((rng.random((b, l)) > 0.2).astype(np.float32))
  return hidden, kernel, targets, weights


def test_flattened_loss_equals_the_unflattened_one(monkeypatch):
  """Values bit for bit; the logits' gradient to within a float32 ulp of its
  largest element: the target's term is the same number, but XLA folds the
  reference's scatter-add into the softmax's gradient, adding in another order
  (observed: 6e-8 where the largest element is ~0.03)."""
  import jax
  hidden, kernel, targets, weights = _loss_case()
  logits = jnp.einsum('bld,dv->blv', hidden, kernel)
  kw = dict(z_loss=1e-4, label_smoothing=0.1)
  ours = lambda x: losses.loss_and_metric_sums(x, targets, weights, segment_ids_BxL=None, **kw)
  loss, sums = jax.jit(ours)(logits)
  grad = jax.jit(jax.grad(lambda x: ours(x)[0]))(logits)
  monkeypatch.setattr(losses, 'pick_targets', _take_along_axis)
  reference = lambda x: _unflattened_sums(x, targets, weights, **kw)
  ref_loss, ref_sums = jax.jit(reference)(logits)
  ref_grad = jax.jit(jax.grad(lambda x: reference(x)[0]))(logits)
  assert float(loss) == float(ref_loss)
  assert {k: float(x) for k, x in sums.items()} == {k: float(x) for k, x in ref_sums.items()}
  ulp = np.spacing(np.float32(np.max(np.abs(ref_grad))))
  assert float(np.max(np.abs(grad - ref_grad))) <= ulp


def test_loss_gradient_through_the_output_projection_has_no_vocab_sized_scatter(monkeypatch):
  """The compiled gradient of (output projection -> loss): autodiff's gather gives a
  scatter-add over [tokens, vocab], a float32 buffer of its own in XLA's CPU program
  (112 MiB for T5.1.1-small's 912 target tokens); `pick_targets` leaves none."""
  import jax
  hidden, kernel, targets, weights = _loss_case()

  def compiled_gradient_hlo():
    loss = lambda h, k: losses.loss_and_metric_sums(
        jnp.einsum('bld,dv->blv', h, k), targets, weights, segment_ids_BxL=None,
        z_loss=1e-4, label_smoothing=0.0)[0]
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel).compile().as_text()

  vocab_sized_scatter = re.compile(r'= f32\[[0-9,]*1000\]\{[0-9,]*\} scatter\(')
  assert not vocab_sized_scatter.search(compiled_gradient_hlo())
  monkeypatch.setattr(losses, 'pick_targets', _take_along_axis)
  assert vocab_sized_scatter.search(compiled_gradient_hlo())   # the test can fail
