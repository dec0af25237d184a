"""Span corruption: length calculus, mask statistics, exact recoverability, seeds."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data import tasks
from t5x_like.data import preprocessors as P
from t5x_like.data import vocabularies

VOCAB = tasks.pydocs_vocabulary()
FIRST_SENTINEL = VOCAB.vocab_size - 1  # 8099: 8000 pieces + 100 extra ids
FEATURES = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}


def _reference_lengths(inputs_length, density=0.15, mean_span=3.0):
    """Brute force over all chunk sizes, written independently of the library."""
    best = None
    for n in range(2, 3 * inputs_length):
        noise = min(max(round(n * density), 1), n - 1)
        spans = min(max(round(noise / mean_span), 1), noise, n - noise)
        if n - noise + spans + 1 <= inputs_length:
            best = (n, noise + spans + 1)
    return best


@pytest.mark.parametrize("inputs_length", [8, 64, 128, 512, 1024])
def test_lengths_match_brute_force(inputs_length):
    assert P.span_corruption_lengths(inputs_length=inputs_length) == \
        _reference_lengths(inputs_length)


def _t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length=3.0):
    """T5's length helper (t5/data/preprocessors.py `random_spans_helper`, one sentinel
    per span and an EOS on each side), rewritten from its description: count
    round(n * density) noise tokens and round(noise / mean) spans for n raw tokens,
    grow n from inputs_length - 1 while the corrupted inputs fit, and at density 0.5,
    if the targets come out longer than the inputs, drop one token (and one target)."""
    def lengths(n):
        noise = int(round(n * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return n - noise + spans + 1, noise + spans + 1
    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    inputs, targets = lengths(n)
    if noise_density == 0.5 and targets > inputs:
        n, targets = n - 1, targets - 1
    return n, targets


def test_lengths_match_t5_at_every_density():
    """T5's numbers for densities 0.05-0.5 and inputs 8-2048, except where T5's helper
    counts no noise token or no span (tiny chunks) while its mask forces one of each:
    there the lengths are what the mask really produces."""
    masks_disagree_with_t5_helper = []
    for density in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
        for inputs_length in range(8, 2049):
            ours = P.span_corruption_lengths(inputs_length=inputs_length,
                                             noise_density=density)
            t5 = _t5_random_spans_helper(inputs_length, density)
            noise = int(round(t5[0] * density))
            if noise >= 1 and int(round(noise / 3.0)) >= 1:
                assert ours == t5, (density, inputs_length, ours, t5)
            else:
                masks_disagree_with_t5_helper.append((density, inputs_length))
                assert ours == _reference_lengths(inputs_length, density), \
                    (density, inputs_length)
    assert {d for d, _ in masks_disagree_with_t5_helper} == {0.05, 0.1, 0.15}
    assert max(n for _, n in masks_disagree_with_t5_helper) == 29
    assert P.span_corruption_lengths(inputs_length=512, noise_density=0.5) == (766, 512)


def test_density_one_half_fits_targets_as_long_as_inputs(lines):
    """T5's 0.5 setting (512/512): the noise mask in the TF graph corrupts 766-token
    chunks into inputs and targets that fit 512 each. Its 128 spans need 128 sentinels,
    more than the default 100 extra ids: a vocabulary with too few is refused."""
    with pytest.raises(ValueError, match="128 noise spans.*100 sentinel"):
        _corrupted(lines, inputs_length=512, targets_length=512, seed=1, n=1,
                   noise_density=0.5)
    vocab = vocabularies.sentencepiece(extra_ids=128)
    features = {"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)}
    examples = _corrupted(lines, inputs_length=512, targets_length=512, seed=1, n=10,
                          noise_density=0.5, features=features)
    for ex in examples:
        tokens, mask = _uncorrupt(ex["inputs"], ex["targets"], vocab)
        assert len(tokens) == 766 and mask.sum() == 383
        assert len(ex["inputs"]) == 512 and len(ex["targets"]) == 512


def test_t5_reference_lengths():
    assert P.span_corruption_lengths(inputs_length=512) == (568, 114)
    assert P.span_corruption_lengths(inputs_length=128) == (141, 29)
    with pytest.raises(ValueError, match="too short"):
        P.span_corruption_lengths(inputs_length=4)


def _uncorrupt(inputs, targets, vocab=VOCAB):
    """Rebuilds (tokens, noise_mask) from one example; checks sentinel order on the way."""
    first_sentinel = vocab.vocab_size - 1
    is_sentinel = lambda t: t > first_sentinel - vocab.extra_ids
    inputs, targets = list(inputs), list(targets)
    assert inputs[-1] == 1 and targets[-1] == 1  # EOS appended
    inputs, targets = inputs[:-1], targets[:-1]
    spans, current = {}, None
    for t in targets:
        if is_sentinel(t):
            assert t not in spans
            spans[t], current = [], t
        else:
            assert current is not None, "targets must start with a sentinel"
            spans[current].append(t)
    sentinels_in = [t for t in inputs if is_sentinel(t)]
    expected = list(range(first_sentinel, first_sentinel - len(sentinels_in), -1))
    assert sentinels_in == expected == list(spans)  # descending from the top, same order
    tokens, mask = [], []
    for t in inputs:
        if t in spans:
            assert spans[t], "every noise span hides at least one token"
            tokens += spans[t]
            mask += [True] * len(spans[t])
        else:
            tokens.append(t)
            mask.append(False)
    return np.array(tokens), np.array(mask)


def _corrupted(lines, *, inputs_length, targets_length, seed, n, features=FEATURES,
               **objective):
    ds = tf.data.Dataset.from_tensor_slices(lines)
    with seqio.utils.map_seed_manager(seed):
        ds = P.span_corruption(ds, {"inputs": inputs_length, "targets": targets_length},
                               features, **objective)
    return list(ds.take(n).as_numpy_iterator())


@pytest.fixture(scope="module")
def lines():
    with open(tasks.SPLIT_FILES["train"], encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@pytest.fixture(scope="module")
def corrupted_128(lines):
    return _corrupted(lines, inputs_length=128, targets_length=29, seed=7, n=2000)


def test_every_token_recovered_exactly(lines, corrupted_128):
    stream, n = [], 0
    for line in lines:  # just enough documents to cover 2000 chunks of 141 tokens
        # The TF SentencePiece op, as in the pipeline: on equal-score segmentations
        # (runs of '-') it can pick a different split than the Python package.
        stream.append(VOCAB.encode_tf(tf.constant(line)).numpy())
        n += len(stream[-1])
        if n > 2000 * 141:
            break
    stream = np.concatenate(stream)
    rebuilt = np.concatenate([_uncorrupt(ex["inputs"], ex["targets"])[0]
                              for ex in corrupted_128])
    assert len(rebuilt) == 2000 * 141 and len(stream) > len(rebuilt)
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])


def test_noise_statistics_on_2000_examples(corrupted_128):
    masks = np.stack([_uncorrupt(ex["inputs"], ex["targets"])[1] for ex in corrupted_128])
    assert masks.shape == (2000, 141)
    density = masks.mean()
    num_spans = (masks[:, 1:] & ~masks[:, :-1]).sum() + masks[:, 0].sum()
    mean_span = masks.sum() / num_spans
    assert abs(density / 0.15 - 1) < 0.01, density
    assert abs(mean_span / 3.0 - 1) < 0.01, mean_span
    # The layout starts with kept tokens and ends with noise (as in T5), so the
    # ends are biased; away from them, noise is spread evenly.
    assert not masks[:, 0].any() and masks[:, -1].all()
    deciles = [d.mean() for d in np.array_split(masks.mean(axis=0), 10)]
    print("noise rate per decile:", np.round(deciles, 3))
    for rate in deciles[2:-2]:
        assert abs(rate - density) < 0.02, deciles


@pytest.mark.parametrize("inputs_length", [64, 128, 512, 1024])
def test_lengths_never_exceed_calculus(lines, inputs_length):
    tokens_length, targets_length = P.span_corruption_lengths(inputs_length=inputs_length)
    examples = _corrupted(lines, inputs_length=inputs_length,
                          targets_length=targets_length, seed=1, n=20)
    for ex in examples:  # full chunks land exactly on the computed lengths
        assert len(ex["inputs"]) == inputs_length
        assert len(ex["targets"]) == targets_length
        assert len(_uncorrupt(ex["inputs"], ex["targets"])[0]) == tokens_length
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32


def test_targets_too_short_is_an_error(lines):
    with pytest.raises(ValueError, match="needs 114"):
        _corrupted(lines, inputs_length=512, targets_length=100, seed=0, n=1)


def test_same_seed_same_masks_other_seed_other_masks(lines):
    def inputs(seed):
        return [ex["inputs"] for ex in _corrupted(lines[:50], inputs_length=64,
                                                  targets_length=64, seed=seed, n=30)]
    a, b, c = inputs(3), inputs(3), inputs(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sum(not np.array_equal(x, y) for x, y in zip(a, c)) >= 25
    # Masks also differ from example to example under one seed.
    assert len({x.tobytes() for x in a}) == len(a)


def test_random_noise_mask_counts():
    for length, (noise, spans) in {568: (85, 28), 141: (21, 7), 2: (1, 1)}.items():
        mask = P.random_noise_mask(length, seed=tf.constant([1, 2])).numpy()
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert (mask.sum(), starts.sum()) == (noise, spans)


def test_sentinel_replacement_small_example():
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16], tf.int32)
    mask = tf.constant([False, True, True, False, False, True, False])
    out = P.replace_spans_with_sentinels(tokens, mask, first_sentinel=99)
    np.testing.assert_array_equal(out, [10, 99, 13, 14, 98, 16])
    out = P.replace_spans_with_sentinels(tokens, ~mask, first_sentinel=99)
    np.testing.assert_array_equal(out, [99, 11, 12, 98, 15, 97])


def test_empty_documents_dropped_and_counted():
    ds = P.lines_to_examples(tf.data.Dataset.from_tensor_slices(
        ["a doc", "   ", "", "\t\n", "another"]))
    assert P.count_empty_text(ds) == (5, 3)
    kept = [ex["text"] for ex in P.drop_empty_text(ds).as_numpy_iterator()]
    assert kept == [b"a doc", b"another"]


def test_rekey_and_concatenate_split():
    ds = tf.data.Dataset.from_tensor_slices({"body": ["x"], "id": ["1"]})
    assert list(P.rekey(ds, {"text": "body", "inputs": None}).as_numpy_iterator()) == \
        [{"text": b"x", "inputs": b""}]
    docs = tf.data.Dataset.from_generator(
        lambda: iter([[1, 2, 3], [4], [5, 6, 7, 8, 9]]),
        output_signature=tf.TensorSpec([None], tf.int32)).map(lambda t: {"targets": t})
    for group_size in (1, 2, 64):  # remainders carried across document groups
        chunks = [c["targets"].tolist() for c in P.concatenate_and_split(
            docs, length=4, group_size=group_size).as_numpy_iterator()]
        assert chunks == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
