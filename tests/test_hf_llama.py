"""Llama checkpoints from Hugging Face: logits parity, round trips, sharded load.

Small random LlamaForCausalLM models are built offline with transformers (torch,
CPU), saved as safetensors, imported, and run on the same tokens.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from t5x_like.parallel import partitioning  # noqa: E402
from t5x_like.training import trainer
from t5x_like.hf import llama as hf_llama  # noqa: E402
from t5x_like.models import decoder  # noqa: E402

LENGTH = 12
CONFIGS = {
    # GQA 6:2, untied output layer.
    'gqa3_untied': dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                        tie_word_embeddings=False, rope_parameters={'rope_type': 'default',
                                                                    'rope_theta': 10000.0}),
    # Odd head count, multi-query (1 kv head), tied embeddings, Llama-3 rope scaling.
    'mqa_odd_tied_llama3rope': dict(
        vocab_size=80, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 16}),
    # Plain multi-head (3 heads, head_dim != hidden/heads); imported as scanned layers.
    'mha3_scanned': dict(vocab_size=64, hidden_size=36, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=10,
                         tie_word_embeddings=False, rms_norm_eps=1e-6,
                         rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0}),
}
OVERRIDES = {'mha3_scanned': {'scan_layers': True}}


def _randomize(model, seed):
  """Weights big enough that logits are O(1-10) (HF's 0.02 init gives ~0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


@functools.lru_cache(maxsize=None)
def hf_checkpoint(name, tmp_root):
  cfg = transformers.LlamaConfig(**CONFIGS[name], attn_implementation='eager')
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  _randomize(model, seed=len(name))
  path = os.path.join(tmp_root, name)
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_llama'))


def _tokens(vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (2, LENGTH)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def _our_logits(cfg, params, tokens):
  return np.asarray(jax.jit(decoder.Decoder(config=cfg).apply, static_argnames='enable_dropout')(
      {'params': params}, jnp.asarray(tokens), enable_dropout=False))


MAX_ABS_DIFF = {}


@pytest.mark.parametrize('name', CONFIGS)
def test_imported_logits_match_transformers(name, tmp_root):
  path, model = hf_checkpoint(name, tmp_root)
  cfg, params = hf_llama.import_checkpoint(path, **OVERRIDES.get(name, {}))
  assert cfg.num_kv_heads == CONFIGS[name]['num_key_value_heads']
  assert cfg.tie_embeddings == CONFIGS[name]['tie_word_embeddings']
  if cfg.scan_layers:
    assert params['layers']['attention']['query']['kernel'].shape[0] == cfg.num_layers
  tokens = _tokens(cfg.vocab_size)
  expected = _hf_logits(model, tokens)
  ours = _our_logits(cfg, params, tokens)
  assert np.abs(expected).max() > 1.0  # not a vacuous comparison of near-zero logits
  diff = float(np.abs(ours - expected).max())
  MAX_ABS_DIFF[name] = diff
  print(f'llama parity {name}: max|diff| = {diff:.2e}')
  assert diff < 1e-4, diff


@pytest.mark.parametrize('name', ['gqa3_untied', 'mqa_odd_tied_llama3rope'])
def test_export_round_trip_is_exact_and_loads_in_transformers(name, tmp_root):
  path, model = hf_checkpoint(name, tmp_root)
  cfg, params = hf_llama.import_checkpoint(path)
  out = os.path.join(tmp_root, name + '_export')
  hf_llama.export_checkpoint(params, cfg, out)
  cfg2, params2 = hf_llama.import_checkpoint(out)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, params2)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  for (n, p), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
    assert n == n2 and torch.equal(p, p2), n
  tokens = _tokens(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_scanned_export_matches_unscanned(tmp_root):
  path, _ = hf_checkpoint('mha3_scanned', tmp_root)
  cfg, params = hf_llama.import_checkpoint(path, scan_layers=True)
  out = os.path.join(tmp_root, 'scanned_export')
  hf_llama.export_checkpoint(params, cfg, out)
  _, flat_params = hf_llama.import_checkpoint(path)
  _, again = hf_llama.import_checkpoint(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               flat_params, again)
  assert json.load(open(os.path.join(out, 'config.json')))['num_key_value_heads'] == 3


def test_import_places_tensors_into_target_shardings(tmp_root):
  path, _ = hf_checkpoint('gqa3_untied', tmp_root)
  cfg, _ = hf_llama.import_checkpoint(path)
  part = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=4,
                                  tensor_parallelism=2)
  model = decoder.DecoderOnlyModel(config=cfg)
  from t5x_like.training import optimizers
  layout = trainer.state_layout(model=model, optimizer=optimizers.adamw(learning_rate=optax.constant_schedule(1e-3)),
                                partitioner=part,
                                feature_lengths={'decoder_target_tokens': LENGTH})
  _, params = hf_llama.import_checkpoint(path, shardings=layout.shardings.params)
  q = params['layers_0']['attention']['query']['kernel']
  assert q.sharding == layout.shardings.params['layers_0']['attention']['query']['kernel']
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'model', None)
  assert q.addressable_shards[0].data.shape == (48 // 4, 6 // 2, 8)
  _, plain = hf_llama.import_checkpoint(path)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(plain['layers_0']['attention']['query']['kernel']))


def test_pickled_checkpoints_are_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(ValueError, match='never loaded'):
    hf_llama.import_checkpoint(str(tmp_path))


def test_export_carries_token_ids_and_positions_of_the_source(tmp_path):
  """A Llama-3-style checkpoint (bos 128000, eos [128001, 128009], 131072 positions):
  import -> export -> transformers reads the same values from config.json and
  generation_config.json, so generation stops on the source's tokens."""
  src, out = str(tmp_path / 'llama3'), str(tmp_path / 'llama3_export')
  cfg = transformers.LlamaConfig(
      vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
      bos_token_id=128000, eos_token_id=[128001, 128009], max_position_embeddings=131072,
      rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 32.0,
                       'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 8192})
  transformers.LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
  ours, params = hf_llama.import_checkpoint(src)
  hf_llama.export_checkpoint(params, ours, out)
  exported = transformers.AutoConfig.from_pretrained(out)
  assert exported.bos_token_id == 128000
  assert list(exported.eos_token_id) == [128001, 128009]
  assert exported.max_position_embeddings == 131072
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.bos_token_id == 128000
  assert list(generation.eos_token_id) == [128001, 128009]
  assert hf_llama.import_checkpoint(out)[0] == ours
