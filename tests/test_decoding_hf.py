"""Greedy and beam search equal Hugging Face `generate` token for token.

Random-weight Llama and T5 models (built offline by tests/test_hf_llama.py and
tests/test_hf_t5.py: GQA, multi-query with an odd head count, tied and untied
output layers, scanned layers, T5.1.1 and the original T5) are imported through
t5x_like.hf and decoded by both sides on batches with padding: Llama prompts of
different lengths (HF: left padding + attention mask; ours: decoder_prompt_lengths),
T5 encoder inputs with padding. EOS is a token the model really produces (the
third greedy token of row 0), so finished rows and padding after EOS are exercised.
Beam search uses our 'hf' rules with HF's `length_penalty`; scores are compared too.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import test_hf_llama  # noqa: E402
import test_hf_t5  # noqa: E402

from t5x_like.decoding import decode  # noqa: E402
from t5x_like.hf import llama as hf_llama  # noqa: E402
from t5x_like.hf import t5 as hf_t5  # noqa: E402
from t5x_like.models import decoder, t5  # noqa: E402

STEPS = 8


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_decode'))


def _zero_after_eos(tokens, eos):
  """HF fills finished beams with EOS when pad_token_id is 0; we write 0."""
  tokens = tokens.copy()
  for row in tokens:
    ends = np.flatnonzero(row == eos)
    if len(ends):
      row[ends[0] + 1:] = 0
  return tokens


def _generated(sequences, prompt_width):
  out = sequences[:, prompt_width:].numpy()
  return np.pad(out, ((0, 0), (0, STEPS - out.shape[1])))


def _greedy_log_prob(hf_out, tokens, eos):
  """Summed log-probabilities of HF's greedy tokens, up to and including EOS."""
  total = np.zeros(len(tokens))
  alive = np.ones(len(tokens), bool)
  for t, logits in enumerate(hf_out.scores):
    logp = torch.log_softmax(logits.float(), -1).numpy()
    total += np.where(alive, logp[np.arange(len(tokens)), tokens[:, t]], 0.0)
    alive &= tokens[:, t] != eos
  return total


def _compare(model, params, batch, generate, prompt_width, *, num_beams, alpha):
  eos = int(_generated(generate(eos=None, do_sample=False).sequences, prompt_width)[0, 2])
  hf_kwargs = dict(do_sample=False, num_beams=num_beams)
  if num_beams > 1:
    hf_kwargs.update(length_penalty=alpha, early_stopping=False)
  hf_out = generate(eos=eos, **hf_kwargs)
  expected = _zero_after_eos(_generated(hf_out.sequences, prompt_width), eos)
  config = decode.DecodeConfig(max_decode_length=STEPS, eos_id=eos, num_beams=num_beams,
                                 length_penalty='hf', alpha=alpha)
  result = decode.predict_batch(model, params, batch, config=config)
  np.testing.assert_array_equal(np.asarray(result.tokens_BxL), expected)
  ends = [np.flatnonzero(row == eos) for row in expected]
  np.testing.assert_array_equal(result.lengths_B, [e[0] + 1 if len(e) else STEPS for e in ends])
  hf_scores = (hf_out.sequences_scores.numpy() if num_beams > 1
               else _greedy_log_prob(hf_out, expected, eos))
  np.testing.assert_allclose(result.scores_B, hf_scores, atol=2e-5, rtol=1e-5)
  return expected, eos


@pytest.mark.parametrize('name,num_beams,alpha', [
    ('gqa3_untied', 1, 1.0),
    ('gqa3_untied', 4, 1.0),
    ('mqa_odd_tied_llama3rope', 1, 1.0),
    ('mqa_odd_tied_llama3rope', 3, 0.6),
    pytest.param('mha3_scanned', 4, 2.0, marks=pytest.mark.slow),
])
def test_llama_decoding_equals_generate(tmp_root, name, num_beams, alpha):
  path, hf_model = test_hf_llama.hf_checkpoint(name, tmp_root)
  config, params = hf_llama.import_checkpoint(path, **test_hf_llama.OVERRIDES.get(name, {}))
  rng = np.random.default_rng(1)
  lengths, width = np.array([7, 3, 5]), 7
  prompts = rng.integers(3, config.vocab_size, (3, width)) * (np.arange(width) < lengths[:, None])
  left_padded = np.stack([np.roll(p, width - n) for p, n in zip(prompts, lengths)])
  attention_mask = np.arange(width)[None] >= (width - lengths)[:, None]

  def generate(*, eos, **kwargs):
    return hf_model.generate(torch.from_numpy(left_padded),
                             attention_mask=torch.from_numpy(attention_mask).long(),
                             max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True, **kwargs)

  batch = {'decoder_input_tokens': prompts.astype(np.int32),
           'decoder_prompt_lengths': lengths.astype(np.int32)}
  expected, eos = _compare(decoder.DecoderOnlyModel(config=config), params, batch, generate,
                           width, num_beams=num_beams, alpha=alpha)
  if num_beams == 1:
    assert (expected == eos).any(axis=1).sum() >= 1      # some row stopped at EOS


@pytest.mark.parametrize('name,num_beams,alpha', [
    ('t5_1_1_untied', 1, 1.0),
    ('t5_1_1_untied', 4, 1.0),
    ('t5_tied_relu', 3, 0.6),
    pytest.param('t5_tied_relu', 1, 1.0, marks=pytest.mark.slow),
])
def test_t5_decoding_equals_generate(tmp_root, name, num_beams, alpha):
  path, hf_model = test_hf_t5.hf_checkpoint(name, tmp_root)
  config, params = hf_t5.import_checkpoint(path)
  rng = np.random.default_rng(1)
  encoder_tokens = rng.integers(3, config.vocab_size, (3, 9))
  encoder_tokens[1, 4:] = 0
  encoder_tokens[2, 6:] = 0

  def generate(*, eos, **kwargs):
    # HF's KV cache for T5 assumes as many decoder as encoder layers (t5_1_1_untied
    # has 2 and 3), so HF recomputes instead: the same numbers, slower.
    return hf_model.generate(torch.from_numpy(encoder_tokens),
                             attention_mask=torch.from_numpy(encoder_tokens > 0).long(),
                             max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=0,
                             decoder_start_token_id=0, use_cache=False,
                             return_dict_in_generate=True, output_scores=True, **kwargs)

  _compare(t5.EncoderDecoderModel(config=config), params,
           {'encoder_input_tokens': encoder_tokens.astype(np.int32)}, generate, 1,
           num_beams=num_beams, alpha=alpha)
