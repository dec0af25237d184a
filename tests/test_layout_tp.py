"""Under tensor parallelism a GQA decoder's 2 kv heads cannot split over 4 or 8
devices: training's fitted layout (params_layout.for_model) replicates them, and
inference, decoding and eval place parameters through that same layout. Results
equal one device's.

Tolerance: tokens exactly; scores and losses to rtol 1e-5, since TP sums heads and
MLP columns in another order (float32 rounding, ~1e-7 per add, over tens of adds).
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like.decoding import decode
from t5x_like.evaluation import teacher_forced
from t5x_like.decoding import inference
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic
from t5x_like.models import decoder

MODEL = decoder.DecoderOnlyModel(config=decoder.DecoderConfig(
    vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=2, head_dim=8, mlp_dim=64,
    num_layers=2))
MESHES = {'tp4': dict(data_parallelism=2, tensor_parallelism=4),
          'tp8': dict(data_parallelism=1, tensor_parallelism=8),
          'fsdp2_tp4': dict(data_parallelism=1, fsdp_parallelism=2, tensor_parallelism=4)}
LENGTHS = {'decoder_target_tokens': 10}


def _kv_kernel(tree):
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return next(v for k, v in flat.items() if k.endswith('attention/key/kernel'))


@functools.lru_cache(maxsize=None)
def _params():
    lengths = MODEL.init_lengths(LENGTHS)
    return nn.unbox(jax.jit(functools.partial(MODEL.init_params, batch_size=1, **lengths))(
        jax.random.key(0)))


def _placed(mesh):
    partitioner = partitioning.Partitioner(**MESHES[mesh])
    target = inference.abstract_params(MODEL, partitioner)
    return partitioner, jax.device_put(_params(), jax.tree.map(lambda a: a.sharding, target))


@pytest.mark.parametrize('mesh', ['tp4', 'fsdp2_tp4'])
def test_inference_layout_is_training_layout(mesh):
    """Failed before: inference built shardings without fitting, so the kv kernel's
    2 heads were laid out over the 4-way model axis (differing from training's)."""
    infer = inference.abstract_params(MODEL, partitioning.Partitioner(**MESHES[mesh]))
    train = trainer.state_layout(
        model=MODEL, optimizer=optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule()),
        partitioner=partitioning.Partitioner(**MESHES[mesh]), feature_lengths=LENGTHS)
    assert jax.tree.map(lambda a: a.sharding, infer) == train.shardings.params
    assert 'model' not in jax.tree.leaves(tuple(_kv_kernel(train.shardings.params).spec))


BATCH_RNG = np.random.default_rng(0)
PROMPT_LENGTHS = BATCH_RNG.integers(1, 6, 8).astype(np.int32)
PROMPTS = {'decoder_input_tokens': BATCH_RNG.integers(3, 64, (8, 6)).astype(np.int32)
           * (np.arange(6) < PROMPT_LENGTHS[:, None]),
           'decoder_prompt_lengths': PROMPT_LENGTHS}
CONFIGS = {'greedy': decode.DecodeConfig(max_decode_length=6, eos_id=5),
           'beam': decode.DecodeConfig(max_decode_length=6, eos_id=5, num_beams=2)}


@functools.lru_cache(maxsize=None)
def _one_device_decode(config):
    result = decode.predict_batch(MODEL, _params(), PROMPTS, config=CONFIGS[config])
    return np.asarray(result.tokens_BxL), np.asarray(result.scores_B)


@pytest.mark.parametrize('mesh,config', [('tp4', 'greedy'), ('fsdp2_tp4', 'beam'),
                                         ('tp8', 'greedy'), ('tp4', 'beam')])
def test_gqa_decoding_under_tp_equals_one_device(mesh, config):
    partitioner, placed = _placed(mesh)
    kv = _kv_kernel(placed)
    assert kv.addressable_shards[0].data.shape == kv.shape or mesh == 'fsdp2_tp4'
    result = decode.predict_batch(MODEL, placed, PROMPTS, config=CONFIGS[config],
                                    partitioner=partitioner)
    tokens, scores = _one_device_decode(config)
    np.testing.assert_array_equal(np.asarray(result.tokens_BxL), tokens)
    np.testing.assert_allclose(np.asarray(result.scores_B), scores, rtol=1e-5, atol=1e-5)


class _Fixed:
    def __init__(self, batches):
        self._batches = batches

    def iterator(self, *, per_host_batch_size, shard_index, num_shards, start_step,
                 position=None):
        rows = slice(shard_index * per_host_batch_size,
                     (shard_index + 1) * per_host_batch_size)
        return iter([{k: v[rows] for k, v in b.items()} for b in self._batches])


def _evaluate(partitioner, params, shardings, batches):
    return teacher_forced.TeacherForcedEvaluator(
        model=MODEL, sources={'task': _Fixed(batches)}, partitioner=partitioner,
        param_shardings=shardings, batch_feature_names=tuple(batches[0]), batch_size=8,
        num_batches=len(batches), logdir=None).evaluate(1, params)['task']


@pytest.mark.parametrize('mesh', ['tp8', 'fsdp2_tp4'])
def test_gqa_eval_under_tp_equals_one_device(mesh):
    source = synthetic.SyntheticDecoderSource(decoder_length=10, vocab_size=64,
                                              pack_segments=2)
    batches = [source.batch(step=s, shard_index=0, batch_size=8) for s in range(2)]
    partitioner, placed = _placed(mesh)
    got = _evaluate(partitioner, placed, jax.tree.map(lambda a: a.sharding, placed), batches)
    one = partitioning.Partitioner(devices=jax.devices()[:1])
    want = _evaluate(one, _params(), jax.tree.map(lambda a: a.sharding, _params()), batches)
    assert got['target_tokens'] == want['target_tokens']
    for key in ('loss', 'cross_entropy', 'accuracy'):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_batch_block_follows_the_batch_sharding():
    """One process here: one block whatever the mesh; the batch rows are all its own."""
    for mesh in MESHES.values():
        assert partitioning.batch_block(partitioning.Partitioner(**mesh)) == \
            partitioning.BatchBlock(index=0, count=1, leads=True)
