"""Decoding on 8 devices (data parallel, FSDP, FSDP x TP meshes) gives the tokens of 1 device,
and beam search keeps each example's KV cache on its own batch shard.

Parameters are placed with their logical shardings (inference.abstract_params), the
batch on the batch sharding. Each family is decoded greedily on one mesh and by beam
search on the others (every pair with `-m slow`). The cache test reads the compiled
program: inside the token loop nothing cache-sized may be gathered or sent between
devices (reordering the beams by global row indices used to gather every layer's
cache onto every device at each step).
"""

import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like.decoding import decode
from t5x_like.decoding import inference
from t5x_like.parallel import partitioning
from t5x_like.models import decoder, t5

MESHES = {'data_parallel': dict(data_parallelism=-1),
          'fsdp': dict(data_parallelism=1, fsdp_parallelism=-1),
          'fsdp_x_tp': dict(data_parallelism=1, fsdp_parallelism=4, tensor_parallelism=2)}
GREEDY = decode.DecodeConfig(max_decode_length=6, eos_id=5)
BEAM = decode.DecodeConfig(max_decode_length=6, eos_id=5, num_beams=2)


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
  result = decode.predict_batch(model, params, batch, config=config)
  return np.asarray(result.tokens_BxL), np.asarray(result.scores_B)


@pytest.mark.parametrize('name,mesh,config', [
    ('decoder', 'data_parallel', GREEDY), ('decoder', 'fsdp', BEAM),
    ('t5', 'fsdp', GREEDY), ('t5', 'data_parallel', BEAM), ('decoder', 'fsdp_x_tp', BEAM),
    pytest.param('t5', 'fsdp_x_tp', BEAM, marks=pytest.mark.slow),
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
  result = decode.predict_batch(model, placed, batch, config=config, partitioner=partitioner)
  tokens, scores = _one_device(name, config)
  np.testing.assert_array_equal(np.asarray(result.tokens_BxL), tokens)
  np.testing.assert_allclose(np.asarray(result.scores_B), scores, rtol=1e-5, atol=1e-5)


# Collectives that move data between devices; all-reduce and reduce-scatter only sum.
_MOVES = re.compile(r'= (\(?[^=]*?\)?) (all-gather|all-to-all|collective-permute)(?:-start)?\(')


def _elements(shapes):
  """Total elements of an HLO result type, e.g. 'f32[16,11,2,8]{3,2,1,0}' or a tuple."""
  return sum(int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for dims in re.findall(r'\[([\d,]*)\]', shapes))


def _moved_inside_loops(hlo):
  """[(collective, result type)] in the while loops' bodies and what they call."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      name = re.match(r'(?:ENTRY )?%?(\S+)', line).group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  todo, seen = re.findall(r'body=%?([\w.\-]+)', hlo), set()
  assert todo, 'no while loop in the compiled program'
  while todo:
    name = todo.pop()
    if name not in seen and name in bodies:
      seen.add(name)
      for line in bodies[name]:
        todo += re.findall(r'(?:to_apply|calls|body|condition)=%?([\w.\-]+)', line)
  return [(m.group(2), m.group(1)) for name in seen for line in bodies[name]
          if (m := _MOVES.search(line))]


@pytest.mark.parametrize('mesh', ['data_parallel', 'fsdp_x_tp'])
@pytest.mark.parametrize('name', ['decoder', 't5'])
def test_beam_search_loop_moves_no_cache_between_devices(name, mesh):
  """Compiled only (not run), with 29 tokens so the cache dwarfs per-step vectors."""
  model, _, batch = _family(name)
  config = decode.DecodeConfig(max_decode_length=29, eos_id=5, num_beams=2)
  partitioner = partitioning.Partitioner(**MESHES[mesh])
  params = inference.abstract_params(model, partitioner)
  with partitioner.context():
    placed = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                      sharding=partitioner.batch_sharding(v.ndim))
              for k, v in batch.items()}
    hlo = decode._jitted_decode(model, config).lower(
        params, placed, rng=jax.random.key(0)).compile().as_text()
  _, state = jax.eval_shape(functools.partial(
      model.decode_prefill, max_decode_length=config.max_decode_length), params, batch)
  # Each device holds at least 1/8 of every cache array (beams included).
  smallest_slice = min(a.size * config.num_beams // 8 for a in jax.tree.leaves(state)
                       if a.ndim >= 4)
  moved = _moved_inside_loops(hlo)
  too_big = [(op, shape) for op, shape in moved if _elements(shape) >= smallest_slice]
  assert not too_big, (smallest_slice, too_big)
  if mesh == 'data_parallel':   # each shard decodes its own examples: nothing moves
    assert not moved, moved
