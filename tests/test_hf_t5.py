"""T5 / T5.1.1 checkpoints from Hugging Face: logits parity and exact round trips."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5x_like.hf import t5 as hf_t5  # noqa: E402
from t5x_like.models import t5  # noqa: E402

ENC_LEN, DEC_LEN = 10, 7
CONFIGS = {
    # T5.1.1: gated-GELU, separate unscaled lm_head; 2 encoder / 3 decoder layers.
    't5_1_1_untied': dict(vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                          num_decoder_layers=3, num_heads=4, feed_forward_proj='gated-gelu',
                          tie_word_embeddings=False),
    # Original T5: ReLU MLP, lm_head tied to the embedding and scaled; 3 heads.
    't5_tied_relu': dict(vocab_size=72, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                         num_heads=3, feed_forward_proj='relu', tie_word_embeddings=True,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


def _randomize(model, seed, untie):
  gen = torch.Generator().manual_seed(seed)
  if untie:  # transformers 5 ties lm_head at init; T5.1.1 has its own.
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif 'relative_attention_bias' in name or name == 'shared.weight':
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


@functools.lru_cache(maxsize=None)
def hf_checkpoint(name, tmp_root):
  kw = dict(CONFIGS[name])
  cfg = transformers.T5Config(**kw, dropout_rate=0.0, attn_implementation='eager')
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  _randomize(model, seed=len(name), untie=not kw['tie_word_embeddings'])
  path = os.path.join(tmp_root, name)
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_t5'))


def _inputs(vocab, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, vocab, (2, ENC_LEN)).astype(np.int32)
  enc[1, 7:] = 0  # padding in the second row
  dec = rng.integers(3, vocab, (2, DEC_LEN)).astype(np.int32)
  dec[:, 0] = 0   # decoder start token
  return enc, dec


def _hf_logits(model, enc, dec):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(enc.astype(np.int64)),
                 attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
                 decoder_input_ids=torch.from_numpy(dec.astype(np.int64))).logits.numpy()


def _our_logits(cfg, params, enc, dec):
  fn = jax.jit(lambda p, e, d: t5.Transformer(config=cfg).apply({'params': p}, e, d,
                                                                 enable_dropout=False))
  return np.asarray(fn(params, jnp.asarray(enc), jnp.asarray(dec)))


@pytest.mark.parametrize('name', CONFIGS)
def test_imported_logits_match_transformers(name, tmp_root):
  path, model = hf_checkpoint(name, tmp_root)
  cfg, params = hf_t5.import_checkpoint(path)
  assert cfg.logits_via_embedding == CONFIGS[name]['tie_word_embeddings']
  enc, dec = _inputs(cfg.vocab_size)
  expected = _hf_logits(model, enc, dec)
  ours = _our_logits(cfg, params, enc, dec)
  assert np.abs(expected).max() > 1.0
  diff = float(np.abs(ours - expected).max())
  print(f't5 parity {name}: max|diff| = {diff:.2e}')
  assert diff < 1e-4, diff


@pytest.mark.parametrize('name', CONFIGS)
def test_export_round_trip_is_exact_and_loads_in_transformers(name, tmp_root):
  path, model = hf_checkpoint(name, tmp_root)
  cfg, params = hf_t5.import_checkpoint(path)
  out = os.path.join(tmp_root, name + '_export')
  hf_t5.export_checkpoint(params, cfg, out)
  cfg2, params2 = hf_t5.import_checkpoint(out)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, params2)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
      out, attn_implementation='eager').eval()
  enc, dec = _inputs(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, enc, dec), _hf_logits(model, enc, dec))


@pytest.mark.parametrize('name', CONFIGS)
def test_scanned_import_and_export_match_transformers(name, tmp_root):
  """scan_layers=True both ways: the imported stacks carry a leading layer axis and
  give HF's logits; the export loads in transformers with the original's logits."""
  path, model = hf_checkpoint(name, tmp_root)
  cfg, params = hf_t5.import_checkpoint(path, scan_layers=True)
  assert cfg.scan_layers
  assert params['decoder']['layers']['mlp']['wo']['kernel'].shape[0] == cfg.num_decoder_layers
  enc, dec = _inputs(cfg.vocab_size)
  diff = float(np.abs(_our_logits(cfg, params, enc, dec) - _hf_logits(model, enc, dec)).max())
  assert diff < 1e-4, diff
  out = os.path.join(tmp_root, name + '_scanned_export')
  hf_t5.export_checkpoint(params, cfg, out)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
      out, attn_implementation='eager').eval()
  enc, dec = _inputs(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, enc, dec), _hf_logits(model, enc, dec))
  _, unscanned = hf_t5.import_checkpoint(path)
  _, again = hf_t5.import_checkpoint(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               unscanned, again)
