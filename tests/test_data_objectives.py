"""Causal LM, prefix LM and the mixture: exact token streams, packing, attention masks
(no cross-segment or future leakage), loss weights, host sharding, resume."""

import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data import tasks
from t5x_like.data import preprocessors as P
from t5x_like.data.pipeline import SeqioDataSource

VOCAB = tasks.pydocs_vocabulary()
EOS, SENTINEL_FLOOR = 1, 8000


@pytest.fixture(scope="module")
def docs():
    with open(tasks.SPLIT_FILES["validation"], encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _ids(text):
    return VOCAB.encode_tf(tf.constant(text)).numpy()


def _take(source, n, **kw):
    kw = {"per_host_batch_size": 4, "shard_index": 0, "num_shards": 1, "start_step": 0, **kw}
    return list(itertools.islice(source.iterator(**kw), n))


def decoder_attention_mask(tokens, segment_ids=None, causal_attention=None):
    """[L, L] bool: may query i attend to key j? seqio/T5X decoder conventions, numpy.

    Causal (j <= i), made bidirectional among positions where decoder_causal_attention
    is 1 (the prefix and the position after it), never to or from padding
    (target token 0), never across packed segments.
    """
    i, j = np.indices((len(tokens), len(tokens)))
    allowed = j <= i
    if causal_attention is not None:
        prefix = causal_attention > 0
        allowed |= prefix[i] & prefix[j]
    allowed &= (tokens[i] > 0) & (tokens[j] > 0)
    if segment_ids is not None:
        allowed &= segment_ids[i] == segment_ids[j]
    return allowed


def _check_row(b, r, *, prefix_lm):
    tgt, inp = b["decoder_target_tokens"][r], b["decoder_input_tokens"][r]
    seg, pos, w = (b["decoder_segment_ids"][r], b["decoder_positions"][r],
                   b["decoder_loss_weights"][r])
    ca = b["decoder_causal_attention"][r] if prefix_lm else None
    mask = decoder_attention_mask(tgt, seg, ca)
    i, j = np.nonzero(mask)
    assert (seg[i] == seg[j]).all() and (seg[i] > 0).all()     # no cross-segment pairs
    assert not w[tgt == 0].any() and not w[seg == 0].any()      # padding never weighted
    # No leakage: a loss-bearing query sees only keys at or before itself, so never the
    # input token that holds its own target (inp[i + 1] == tgt[i]).
    for q in np.nonzero(w)[0]:
        assert np.nonzero(mask[q])[0].max() <= q
    for s in np.unique(seg[seg > 0]):
        at = seg == s
        np.testing.assert_array_equal(pos[at], np.arange(at.sum()))
        np.testing.assert_array_equal(inp[at], np.concatenate([[0], tgt[at][:-1]]))
        if prefix_lm:  # [prefix .. EOS][suffix .. EOS]: loss on the suffix only
            k = int((w[at] == 0).sum())
            assert 2 <= k and tgt[at][k - 1] == EOS and tgt[at][-1] == EOS
            np.testing.assert_array_equal(w[at], np.arange(at.sum()) >= k)
            np.testing.assert_array_equal(ca[at], np.arange(at.sum()) <= k)
            assert mask[np.ix_(at, at)][:k + 1, :k + 1].all()  # bidirectional prefix
        else:
            assert w[at].all()


def test_mask_builder_matches_seqio_docstring_example():
    # seqio's PrefixLMFeatureConverter example: inputs [7 8 5 1], targets [3 9 1].
    tgt = np.array([7, 8, 5, 1, 3, 9, 1, 0])
    ca = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    m = decoder_attention_mask(tgt, np.array([1] * 7 + [0]), ca)
    assert m[:5, :5].all() and not m[4, 5] and m[5, :6].all() and not m[5, 6]
    assert not m[7].any() and not m[:, 7].any()


def test_causal_lm_stream_is_documents_with_eos(docs):
    source = SeqioDataSource(mixture_or_task_name="pydocs_lm", split="validation",
                             task_feature_lengths={"targets": 64}, feature_converter="lm",
                             shuffle=False, pack=False)
    expected = np.concatenate([np.append(_ids(d), EOS) for d in docs if d.strip()])
    batches = _take(source, len(expected) // (4 * 64) + 1)
    rows = np.concatenate([b["decoder_target_tokens"] for b in batches])
    assert (rows != 0).all()                                    # every chunk is full
    stream = rows.reshape(-1)
    np.testing.assert_array_equal(stream[:len(expected)], expected)
    assert all(b["decoder_loss_weights"].all() for b in batches)


def test_causal_lm_packed_masks():
    source = SeqioDataSource(mixture_or_task_name="pydocs_lm", feature_converter="lm",
                             task_feature_lengths={"targets": 48}, shuffle=False)
    for b in _take(source, 2):
        for r in range(4):
            _check_row(b, r, prefix_lm=False)


def test_prefix_lm_examples_split_the_stream(docs):
    ds = tf.data.Dataset.from_tensor_slices(docs)
    with seqio.utils.map_seed_manager(3):
        ds = P.prefix_lm(ds, {"inputs": 16, "targets": 16},
                         {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)})
    examples = list(ds.take(400).as_numpy_iterator())
    n = P.prefix_lm_tokens_length(inputs_length=16, targets_length=16)
    assert n == 14
    splits, rebuilt = [], []
    for ex in examples:
        assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
        prefix, suffix = ex["inputs"][:-1], ex["targets"][:-1]
        assert len(prefix) >= 1 and len(suffix) >= 1 and len(prefix) + len(suffix) == n
        splits.append(len(prefix))
        rebuilt.extend([*prefix, *suffix])
    expected = np.concatenate([_ids(d) for d in docs if d.strip()])
    np.testing.assert_array_equal(rebuilt, expected[:len(rebuilt)])
    counts = np.bincount(splits, minlength=n)[1:]               # split points 1..13
    assert len(counts) == n - 1 and counts.min() >= 15          # ~30 each: uniform
    with pytest.raises(ValueError, match="too short for prefix LM"):
        P.prefix_lm_tokens_length(inputs_length=3, targets_length=64)


def test_prefix_lm_packed_masks_and_loss_on_suffix_only():
    source = SeqioDataSource(mixture_or_task_name="pydocs_prefix_lm",
                             feature_converter="prefix_lm",
                             task_feature_lengths={"inputs": 24, "targets": 24})
    assert source.model_feature_lengths()["decoder_causal_attention"] == 48
    for b in _take(source, 2):
        assert b["decoder_target_tokens"].shape == (4, 48)
        for r in range(4):
            _check_row(b, r, prefix_lm=True)


def test_lm_two_hosts_cover_each_document_once(docs):
    source = SeqioDataSource(mixture_or_task_name="pydocs_lm", split="validation",
                             task_feature_lengths={"targets": 64}, feature_converter="lm",
                             shuffle=False, pack=False)
    for shard in (0, 1):  # one file: seqio shards by line (even / odd)
        expected = np.concatenate([np.append(_ids(d), EOS) for d in docs[shard::2]
                                   if d.strip()])
        batches = _take(source, len(expected) // (4 * 64) + 2, shard_index=shard,
                        num_shards=2)
        stream = np.concatenate([b["decoder_target_tokens"] for b in batches]).reshape(-1)
        np.testing.assert_array_equal(stream[:len(expected)], expected)


def test_mixture_rates_and_resume():
    lengths = {"inputs": 64, "targets": 16}
    source = SeqioDataSource(mixture_or_task_name="pydocs_mixture", seed=2, pack=False,
                             task_feature_lengths=lengths)
    batches = _take(source, 100)
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    span = (targets >= SENTINEL_FLOOR).any(axis=1)              # sentinels: span corruption
    assert abs(span.mean() - 0.75) < 0.07, span.mean()          # rates 3:1, 400 examples
    resumed = _take(source, 3, start_step=97)
    for a, b in zip(batches[97:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_converter_and_length_mismatches_are_errors():
    with pytest.raises(ValueError, match="use 'lm' for targets-only"):
        SeqioDataSource(mixture_or_task_name="pydocs_lm", task_feature_lengths={"targets": 8})
    with pytest.raises(ValueError, match="does not use"):
        SeqioDataSource(mixture_or_task_name="pydocs_lm", feature_converter="lm",
                        task_feature_lengths={"inputs": 8, "targets": 8})
    short = SeqioDataSource(mixture_or_task_name="pydocs_lm", feature_converter="lm",
                            task_feature_lengths={"targets": 1})
    with pytest.raises(ValueError, match="too short for causal LM"):
        short.iterator(per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0)
