"""decoding/decode.py and the models' KV caches: cached logits equal full recomputation,
sampling (seeded, top-k, top-p statistics), EOS handling, beam search with T5X's
rules against an exhaustive search, and DecodeConfig checks.

Parity with Hugging Face `generate` is in test_decoding_hf.py, sharded decoding in
test_decoding_sharded.py.
"""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.decoding import beam_search
from t5x_like.decoding import decode
from t5x_like.models import decoder, t5

DECODER = decoder.DecoderConfig(vocab_size=64, emb_dim=32, num_heads=6, num_kv_heads=2,
                                head_dim=8, mlp_dim=48, num_layers=2)
T5 = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=3, head_dim=8, mlp_dim=48,
                 num_encoder_layers=2, num_decoder_layers=2)


@functools.lru_cache(maxsize=None)
def _decoder_model_and_params(scan_layers):
  model = decoder.DecoderOnlyModel(config=dataclasses.replace(DECODER, scan_layers=scan_layers))
  init = functools.partial(model.init_params, batch_size=1, decoder_length=4)
  return model, nn.unbox(jax.jit(init)(jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _t5_model_and_params(scan_layers):
  model = t5.EncoderDecoderModel(config=dataclasses.replace(T5, scan_layers=scan_layers))
  init = functools.partial(model.init_params, batch_size=1, encoder_length=4, decoder_length=4)
  return model, nn.unbox(jax.jit(init)(jax.random.key(1)))


def _cached_logits(model, params, batch, fed_BxN):
  """Logits of the prefill and of every step, feeding fed_BxN's tokens: [B, N, V]."""
  steps = fed_BxN.shape[1]
  prefill = jax.jit(functools.partial(model.decode_prefill, max_decode_length=steps))
  logits, state = prefill(params, batch)
  out = [logits]
  step = jax.jit(model.decode_step)
  for t in range(steps - 1):
    logits, state = step(params, state, jnp.asarray(fed_BxN[:, t]), t)
    out.append(logits)
  return np.stack(out, axis=1)


# ---------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('prefix_lm', [False, True])
def test_decoder_cache_equals_full_recompute_on_padded_prompts(scan_layers, prefix_lm):
  """Prompts of 7, 2 and 4 tokens in one batch (left-aligned in the cache, padding
  masked): every cached step's logits equal a full forward over prompt + tokens."""
  model, params = _decoder_model_and_params(scan_layers)
  rng = np.random.default_rng(0)
  lengths, width, steps = np.array([7, 2, 4]), 7, 5
  rows = rng.integers(3, 64, (3, width + steps)).astype(np.int32)
  in_prompt = np.arange(width)[None] < lengths[:, None]
  batch = {'decoder_input_tokens': rows[:, :width] * in_prompt}
  if prefix_lm:
    batch['decoder_causal_attention'] = in_prompt.astype(np.int32)
  else:
    batch['decoder_prompt_lengths'] = lengths.astype(np.int32)
  fed = np.stack([row[n:n + steps] for row, n in zip(rows, lengths)])
  cached = _cached_logits(model, params, batch, fed)
  # The reference: each row's prompt + fed tokens at the start of the row, so
  # causality keeps every real position off the padding that follows.
  full_rows = rows * (np.arange(width + steps)[None] < (lengths + steps)[:, None])
  reference = {'decoder_input_tokens': full_rows}
  if prefix_lm:
    reference['decoder_causal_attention'] = (np.arange(width + steps)[None]
                                             < lengths[:, None]).astype(np.int32)
  full = np.asarray(jax.jit(model.logits)(params, reference))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(cached[b], full[b, n - 1:n - 1 + steps], atol=1e-5, rtol=0)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_t5_cache_equals_full_recompute(scan_layers):
  """Encode once, cross-attention keys/values cached, one decoder position per step:
  the logits equal the teacher-forced forward over the whole decoder input."""
  model, params = _t5_model_and_params(scan_layers)
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 64, (3, 9)).astype(np.int32)
  enc[1, 4:] = 0
  enc[2, 6:] = 0
  fed = rng.integers(3, 64, (3, 6)).astype(np.int32)
  cached = _cached_logits(model, params, {'encoder_input_tokens': enc}, fed)
  decoder_input = np.concatenate([np.zeros((3, 1), np.int32), fed[:, :-1]], axis=1)
  full = jax.jit(lambda p, e, d: model.module.apply({'params': p}, e, d, enable_dropout=False))(
      params, enc, decoder_input)
  np.testing.assert_allclose(cached, np.asarray(full), atol=1e-5, rtol=0)


def test_decoder_batch_must_mark_its_prompts():
  model, params = _decoder_model_and_params(False)
  with pytest.raises(ValueError, match='decoder_prompt_lengths'):
    model.decode_prefill(params, {'decoder_input_tokens': jnp.ones((1, 3), jnp.int32)},
                         max_decode_length=2)


# ---------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_from_the_seed_and_greedy_ignores_it():
  model, params = _decoder_model_and_params(False)
  batch = {'decoder_input_tokens': np.array([[0, 5, 6, 7], [0, 9, 0, 0]], np.int32),
           'decoder_prompt_lengths': np.array([4, 2], np.int32)}
  run = lambda config, seed: np.asarray(decode.predict_batch(
      model, params, batch, config=config, rng=jax.random.key(seed)).tokens_BxL)
  sampled = decode.DecodeConfig(max_decode_length=12, temperature=1.5, eos_id=99)
  np.testing.assert_array_equal(run(sampled, 7), run(sampled, 7))
  assert (run(sampled, 7) != run(sampled, 8)).any()
  greedy = decode.DecodeConfig(max_decode_length=12, eos_id=99)
  np.testing.assert_array_equal(run(greedy, 7), run(greedy, 8))


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_top_k_never_leaves_the_k_best():
  logits = jax.random.normal(jax.random.key(0), (2000, 50)) * 3
  config = decode.DecodeConfig(temperature=1.0, top_k=5)
  tokens = np.asarray(decode.next_tokens(logits, jax.random.key(1), config))
  top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  assert all(t in row for t, row in zip(tokens, top5))
  assert len(set(tokens)) > 5    # it really samples (rows differ)


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 0.8), (0.7, 6, 0.9)])
def test_top_p_samples_the_renormalised_nucleus(temperature, top_k, top_p):
  """200,000 draws over a 10-token vocabulary (seed fixed): tokens outside the nucleus
  never appear, and the total-variation distance to the truncated, renormalised
  softmax is below 0.005 (its standard error here is ~0.001)."""
  logits = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -1.0, -2.0, -3.0], np.float32)
  draws = 200_000
  config = decode.DecodeConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  tokens = np.asarray(decode.next_tokens(
      jnp.broadcast_to(jnp.asarray(logits), (draws, 10)), jax.random.key(0), config))
  # Reference, written independently: temperature, keep the k best, then the most
  # likely tokens until their mass reaches top_p, renormalise.
  probs = _softmax(logits / temperature)
  if top_k:
    probs[np.argsort(-probs)[top_k:]] = 0
    probs /= probs.sum()
  order = np.argsort(-probs)
  mass_before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[mass_before < top_p]
  expected = np.zeros(10)
  expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
  empirical = np.bincount(tokens, minlength=10) / draws
  assert set(np.flatnonzero(empirical)) == set(nucleus)
  assert 0.5 * np.abs(empirical - expected).sum() < 0.005


def _toy_step(table_LxVxV):
  """A Markov 'model': logits of token t+1 = table[t + 1, token t]. State: a dummy."""
  def step(state, tokens_B, position):
    return table_LxVxV[position + 1][tokens_B], state
  return step


def test_eos_stops_a_row_pads_after_it_and_ends_its_score():
  vocab, length, eos = 6, 5, 1
  table = np.full((length, vocab, vocab), -5.0, np.float32)
  table[:, :, 4] = 5.0          # greedy: 4 4 4 ...
  table[2, 4, eos] = 9.0        # ... except that after step 1, row state 4 -> EOS
  first = np.full((2, vocab), -5.0, np.float32)
  first[0, 4] = 5.0
  first[1, 3] = 5.0             # row 1 starts with 3, never meets EOS
  table[:, 3, 3] = 6.0
  result = decode.sample(_toy_step(jnp.asarray(table)), jnp.asarray(first),
                           {'dummy': jnp.zeros(2)},
                           config=decode.DecodeConfig(max_decode_length=length, eos_id=eos),
                           rng=jax.random.key(0))
  np.testing.assert_array_equal(result.tokens_BxL, [[4, 4, eos, 0, 0], [3, 3, 3, 3, 3]])
  np.testing.assert_array_equal(result.lengths_B, [3, 5])
  log_softmax = lambda x: x - np.log(np.exp(x).sum())
  expected0 = (log_softmax(first[0])[4] + log_softmax(table[1, 4])[4]
               + log_softmax(table[2, 4])[eos])
  np.testing.assert_allclose(result.scores_B[0], expected0, rtol=1e-6)


# ---------------------------------------------------------------------------- beam search

def _exhaustive_best(first_logp, step_logp, *, length, eos, alpha):
  """T5X's objective by brute force: the best sequence ending in EOS within `length`
  tokens, scored by summed log-probability / ((5 + n) / 6) ** alpha."""
  vocab = first_logp.shape[-1]
  best = (-np.inf, None)
  for n in range(1, length + 1):
    for body in itertools.product([v for v in range(vocab) if v != eos], repeat=n - 1):
      seq = list(body) + [eos]
      logp = first_logp[seq[0]] + sum(step_logp[t + 1][seq[t], seq[t + 1]]
                                      for t in range(n - 1))
      score = logp / ((5.0 + n) / 6.0) ** alpha
      if score > best[0]:
        best = (score, seq)
  return best


@pytest.mark.parametrize('alpha', [0.6, 2.0])
def test_t5x_beam_search_with_every_prefix_kept_finds_the_exhaustive_optimum(alpha):
  """With more beams than prefixes (vocabulary 4, length 4: 27 live prefixes at most,
  54 beams), T5X's beam search must return the global optimum of its brevity-
  penalised score; a strong alpha favours longer sequences."""
  vocab, length, eos = 4, 4, 1
  rng = np.random.default_rng(3)
  table = rng.normal(0, 1.5, (length, vocab, vocab)).astype(np.float32)
  first = rng.normal(0, 1.5, (1, vocab)).astype(np.float32)
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  score, seq = _exhaustive_best(log_softmax(first[0]), log_softmax(table), length=length,
                                eos=eos, alpha=alpha)
  tokens, scores = jax.jit(functools.partial(
      beam_search.beam_search, _toy_step(jnp.asarray(table)), num_beams=54,
      max_decode_length=length, eos_id=eos, rules=beam_search.RULES['t5x'], alpha=alpha))(
          jnp.asarray(first), {'dummy': jnp.zeros(1)})
  np.testing.assert_array_equal(tokens[0], seq + [0] * (length - len(seq)))
  np.testing.assert_allclose(scores[0], score, rtol=1e-5)


def test_t5x_beam_search_returns_the_best_live_beam_when_nothing_finishes():
  vocab, length, eos = 4, 3, 99     # no token is EOS
  rng = np.random.default_rng(4)
  table = rng.normal(0, 1.5, (length, vocab, vocab)).astype(np.float32)
  first = rng.normal(0, 1.5, (1, vocab)).astype(np.float32)
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  lp, lt = log_softmax(first[0]), log_softmax(table)
  best = max(itertools.product(range(vocab), repeat=length),
             key=lambda s: lp[s[0]] + lt[1][s[0], s[1]] + lt[2][s[1], s[2]])
  tokens, scores = beam_search.beam_search(
      _toy_step(jnp.asarray(table)), jnp.asarray(first), {'dummy': jnp.zeros(1)}, num_beams=16,
      max_decode_length=length, eos_id=eos, rules=beam_search.RULES['t5x'], alpha=0.6)
  np.testing.assert_array_equal(tokens[0], best)
  np.testing.assert_allclose(scores[0], lp[best[0]] + lt[1][best[0], best[1]]
                             + lt[2][best[1], best[2]], rtol=1e-5)


def test_penalties_are_the_published_formulas():
  np.testing.assert_allclose(beam_search.RULES['t5x'].penalty(7, 0.6), (12 / 6) ** 0.6)
  np.testing.assert_allclose(beam_search.RULES['hf'].penalty(7, 1.5), 7 ** 1.5)


@pytest.mark.parametrize('bad,message', [
    (dict(max_decode_length=0), 'max_decode_length'),
    (dict(temperature=-1.0), 'temperature'),
    (dict(top_p=0.0), 'top_p'),
    (dict(num_beams=4, temperature=0.5), 'beam search takes no temperature'),
    (dict(length_penalty='gnmt'), 'length_penalty'),
])
def test_decode_config_names_what_is_wrong(bad, message):
  with pytest.raises(ValueError, match=message):
    decode.DecodeConfig(**bad)
