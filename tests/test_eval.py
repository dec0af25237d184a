"""Teacher-forced eval metrics against a numpy recomputation (padding and packing)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn

from t5x_like.evaluation import teacher_forced
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.training import optimizers
from t5x_like.data import synthetic
from t5x_like.models import decoder, t5

VOCAB = 64
Z_LOSS = 1e-4


class FixedBatches:
    """A source of given global batches (shard s gets its rows of each)."""

    def __init__(self, batches):
        self._batches = batches

    def model_feature_lengths(self):
        return {k: v.shape[1] for k, v in self._batches[0].items()}

    def iterator(self, *, per_host_batch_size, shard_index, num_shards, start_step,
                 position=None):
        rows = slice(shard_index * per_host_batch_size, (shard_index + 1) * per_host_batch_size)
        return iter([{k: v[rows] for k, v in b.items()} for b in self._batches[start_step:]])


def enc_dec_batch(rng, *, rows, enc_len, dec_len, packed):
    """Real-looking seqio enc_dec features: padded at the end, or two segments a row."""
    enc = rng.integers(3, VOCAB, (rows, enc_len)).astype(np.int32)
    targets = rng.integers(3, VOCAB, (rows, dec_len)).astype(np.int32)
    batch = {}
    if packed:
        # Two examples a row: decoder positions 0-2 and 3..L-3, then 2 padding slots.
        split = 3
        dec_seg = np.where(np.arange(dec_len) < split, 1, 2)[None].repeat(rows, 0)
        dec_seg[:, -2:] = 0
        enc_seg = np.where(np.arange(enc_len) < enc_len // 2, 1, 2)[None].repeat(rows, 0)
        enc_seg[:, -3:] = 0
        dec_pos = np.where(dec_seg == 1, np.arange(dec_len), np.arange(dec_len) - split)
        dec_pos = np.where(dec_seg > 0, dec_pos, 0).astype(np.int32)
        targets = np.where(dec_seg > 0, targets, 0)
        enc = np.where(enc_seg > 0, enc, 0)
        inputs = np.where(dec_pos == 0, 0, np.roll(targets, 1, axis=1))
        batch.update(encoder_segment_ids=enc_seg.astype(np.int32),
                     decoder_segment_ids=dec_seg.astype(np.int32),
                     encoder_positions=np.zeros_like(enc), decoder_positions=dec_pos)
    else:
        lengths = rng.integers(2, dec_len + 1, rows)        # some rows padded
        targets = np.where(np.arange(dec_len)[None] < lengths[:, None], targets, 0)
        enc[:, -rng.integers(1, enc_len // 2):] = 0
        inputs = np.concatenate([np.zeros((rows, 1), np.int32), targets[:, :-1]], 1)
    batch.update(encoder_input_tokens=enc, decoder_target_tokens=targets,
                 decoder_input_tokens=inputs.astype(np.int32),
                 decoder_loss_weights=(targets > 0).astype(np.int32))
    return batch


def numpy_metrics(logits_list, batches):
    """The metrics from logits, in float64 numpy: what evaluation/teacher_forced.py must report."""
    loss = ce_sum = hits = tokens = 0.0
    for logits, batch in zip(logits_list, batches):
        logits = np.asarray(logits, np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target_logit = np.take_along_axis(logits, batch["decoder_target_tokens"][..., None],
                                          -1)[..., 0]
        w = batch["decoder_loss_weights"].astype(np.float64)
        ce = lse - target_logit
        ce_sum += (w * ce).sum()
        loss += (w * (ce + Z_LOSS * lse ** 2)).sum()
        hits += (w * (logits.argmax(-1) == batch["decoder_target_tokens"])).sum()
        tokens += w.sum()
    return {"loss": loss / tokens, "cross_entropy": ce_sum / tokens,
            "perplexity": np.exp(ce_sum / tokens), "accuracy": hits / tokens,
            "target_tokens": tokens}


def check_against_numpy(model, batches, init_lengths):
    partitioner = partitioning.Partitioner()          # data parallel over 8 devices
    lengths = {k: v.shape[1] for k, v in batches[0].items()}
    layout = trainer.state_layout(model=model, optimizer=optimizers.adafactor(
        learning_rate=optimizers.rsqrt_schedule()), partitioner=partitioner,
        feature_lengths=lengths)
    params = jax.jit(lambda r: nn.unbox(model.init_params(r, batch_size=1, **init_lengths)),
                     out_shardings=layout.shardings.params)(jax.random.key(1))
    evaluator = teacher_forced.TeacherForcedEvaluator(
        model=model, sources={"task": FixedBatches(batches)}, partitioner=partitioner,
        param_shardings=layout.shardings.params, batch_feature_names=tuple(lengths),
        batch_size=8, num_batches=len(batches), logdir=None)
    got = evaluator.evaluate(7, params)["task"]
    logits = [jax.jit(model.logits)(params, batch) for batch in batches]
    want = numpy_metrics(logits, batches)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=2e-6), key
    return got


T5_CONFIG = t5.T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                        num_encoder_layers=1, num_decoder_layers=1)


@pytest.mark.parametrize("packed", [False, True])
def test_t5_eval_metrics_equal_numpy_over_batches_of_different_sizes(packed):
    # Label smoothing and per-sequence normalisation are training settings: eval
    # numbers stay per real token, without smoothing.
    model = t5.EncoderDecoderModel(config=T5_CONFIG, label_smoothing=0.1,
                                   loss_normalization="sequences", z_loss=Z_LOSS)
    rng = np.random.default_rng(0)
    batches = [enc_dec_batch(rng, rows=8, enc_len=12, dec_len=7, packed=packed)
               for _ in range(2)]
    if not packed:                                   # a second batch with far fewer tokens
        batches[1]["decoder_loss_weights"][:, 2:] = 0
    got = check_against_numpy(model, batches, {"encoder_length": 12, "decoder_length": 7})
    assert got["target_tokens"] == sum(b["decoder_loss_weights"].sum() for b in batches)


def test_decoder_only_packed_eval_metrics_equal_numpy():
    model = decoder.DecoderOnlyModel(config=decoder.DecoderConfig(
        vocab_size=VOCAB, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
        num_layers=1), z_loss=Z_LOSS)
    source = synthetic.SyntheticDecoderSource(decoder_length=10, vocab_size=VOCAB,
                                              pack_segments=3)
    batches = [source.batch(step=s, shard_index=0, batch_size=8) for s in range(2)]
    batches[1]["decoder_loss_weights"][:4] = 0       # rows that count for nothing
    check_against_numpy(model, batches, {"decoder_length": 10})


def test_summarize_divides_sums_once_and_guards_overflow():
    metrics = teacher_forced.summarize({"loss_sum": 30.0, "z_loss_sum": 2.0, "accuracy_sum": 5.0,
                                    "weight_sum": 10.0})
    assert metrics == pytest.approx({"loss": 3.0, "cross_entropy": 2.8,
                                     "perplexity": np.exp(2.8), "accuracy": 0.5,
                                     "target_tokens": 10.0}, rel=1e-15)
    assert np.isfinite(teacher_forced.summarize(
        {"loss_sum": 1e6, "z_loss_sum": 0.0, "accuracy_sum": 0.0, "weight_sum": 1.0})["perplexity"])


def test_per_token_model_keeps_the_model_otherwise():
    model = t5.EncoderDecoderModel(config=T5_CONFIG, label_smoothing=0.2, z_loss=3e-4,
                                   loss_normalization="total_tokens")
    assert teacher_forced.per_token_model(model) == dataclasses.replace(
        model, label_smoothing=0.0, loss_normalization="tokens")
