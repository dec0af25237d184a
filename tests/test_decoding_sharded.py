"""Decoding on 8 devices (data parallel and FSDP meshes) gives the tokens of 1 device.

Parameters are placed with their logical shardings (inference.abstract_params), the
batch on the batch sharding. Each family is decoded greedily on one mesh and by beam
search on the other (all four pairs with `-m slow`).
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like import decoding, inference, partitioning
from t5x_like.models import decoder, t5

MESHES = {'data_parallel': dict(data_parallelism=-1),
          'fsdp': dict(data_parallelism=1, fsdp_parallelism=-1)}
GREEDY = decoding.DecodeConfig(max_decode_length=6, eos_id=5)
BEAM = decoding.DecodeConfig(max_decode_length=6, eos_id=5, num_beams=2)


@functools.lru_cache(maxsize=None)
def _family(name):
  rng = np.random.default_rng(0)
  if name == 'decoder':
    model = decoder.DecoderOnlyModel(config=decoder.DecoderConfig(
        vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
        num_layers=2))
    lengths = rng.integers(1, 6, 8).astype(np.int32)
    tokens = rng.integers(3, 64, (8, 6)).astype(np.int32) * (np.arange(6) < lengths[:, None])
    batch = {'decoder_input_tokens': tokens, 'decoder_prompt_lengths': lengths}
  else:
    model = t5.EncoderDecoderModel(config=t5.T5Config(
        vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
        num_encoder_layers=2, num_decoder_layers=2))
    tokens = rng.integers(3, 64, (8, 7)).astype(np.int32)
    tokens[::2, 4:] = 0
    batch = {'encoder_input_tokens': tokens}
  lengths = model.init_lengths({'encoder_input_tokens': 4, 'decoder_target_tokens': 4})
  params = nn.unbox(jax.jit(functools.partial(model.init_params, batch_size=1, **lengths))(
      jax.random.key(0)))
  return model, params, batch


@functools.lru_cache(maxsize=None)
def _one_device(name, config):
  model, params, batch = _family(name)
  result = decoding.predict_batch(model, params, batch, config=config)
  return np.asarray(result.tokens_BxL), np.asarray(result.scores_B)


@pytest.mark.parametrize('name,mesh,config', [
    ('decoder', 'data_parallel', GREEDY), ('decoder', 'fsdp', BEAM),
    ('t5', 'fsdp', GREEDY), ('t5', 'data_parallel', BEAM),
    pytest.param('decoder', 'fsdp', GREEDY, marks=pytest.mark.slow),
    pytest.param('t5', 'fsdp', BEAM, marks=pytest.mark.slow),
])
def test_sharded_decoding_equals_one_device(name, mesh, config):
  assert jax.device_count() == 8
  model, params, batch = _family(name)
  partitioner = partitioning.Partitioner(**MESHES[mesh])
  target = inference.abstract_params(model, partitioner)
  placed = jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
  if mesh == 'fsdp':   # really split: the embedding's 'embed' axis is over 8 devices
    assert len(placed['token_embedder']['embedding'].sharding.device_set) == 8
    assert placed['token_embedder']['embedding'].addressable_shards[0].data.shape[1] == 4
  result = decoding.predict_batch(model, placed, batch, config=config, partitioner=partitioner)
  tokens, scores = _one_device(name, config)
  np.testing.assert_array_equal(np.asarray(result.tokens_BxL), tokens)
  np.testing.assert_allclose(np.asarray(result.scores_B), scores, rtol=1e-5, atol=1e-5)
