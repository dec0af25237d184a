"""seqio preprocessors for pretraining objectives: span corruption, causal LM, prefix LM.

Every objective accepts raw text (scalar lines or a 'text' feature) or token ids
already in 'targets' (e.g. after `tokenize` and a `seqio.CacheDatasetPlaceholder`),
concatenates documents into one stream and cuts it into chunks sized so the result
fits `sequence_length` exactly: no token is wasted on padding or cut by trimming.

  span_corruption  inputs/targets: T5's objective (below).
  causal_lm        targets: documents + EOS each, concatenated, cut into chunks of
                   sequence_length['targets'] (EOS marks document ends inside a chunk).
  prefix_lm        inputs/targets: chunks of min(inputs, targets) - 2 tokens split at a
                   uniformly random point (both sides non-empty) + EOS each; the
                   prefix-LM feature converter puts loss on the suffix only.

Span corruption (Raffel et al., 2020) in one picture, for tokens t0..t9 where t3 t4
and t8 are chosen as noise and the sentinels are S1 = vocab_size-1, S2 = vocab_size-2:

    tokens   t0 t1 t2 [t3 t4] t5 t6 t7 [t8] t9 ...
    inputs   t0 t1 t2 S1 t5 t6 t7 S2 t9 ... EOS
    targets  S1 t3 t4 S2 t8 ... EOS

Every noise span becomes one sentinel in the inputs; the targets list each sentinel
followed by the tokens it hides. Sentinels count down from the top of the output
vocabulary, which for seqio's SentencePieceVocabulary is where the `extra_ids` live.

The pipeline (`span_corruption`) is: raw lines -> drop empty documents -> tokenize ->
concatenate all documents into one token stream and cut it into chunks of exactly
`tokens_length` (so no token is wasted on padding) -> choose a random noise mask per
chunk -> build inputs/targets -> append EOS. No separator is inserted between
documents (as in T5): a chunk may straddle two documents, and EOS stays reserved for
"end of this example". Randomness is stateless and seeded per example through
`seqio.map_over_dataset(num_seeds=...)`, so a given seqio seed always produces the same
masks, and (because seqio runs these preprocessors after `repeat`) each epoch gets
fresh masks and chunk boundaries.

Pure-Python `span_corruption_lengths` gives the length calculus (512 -> 568/114).
`OBJECTIVES` (at the end) names each objective and the task features it emits: adding
an objective is its preprocessor plus one entry there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import seqio
import tensorflow as tf

from t5x_like import errors

DEFAULT_NOISE_DENSITY = 0.15
DEFAULT_MEAN_NOISE_SPAN_LENGTH = 3.0
# Below this many encoder tokens the objective degenerates (one or two spans per
# example, mostly sentinels and EOS); refuse rather than train on it silently.
MIN_INPUTS_LENGTH = 8
# Causal LM: a chunk needs at least two tokens to predict one from another.
MIN_LM_LENGTH = 2
# Prefix LM: min(inputs, targets) - 2 tokens per chunk must leave a non-empty prefix
# and suffix.
MIN_PREFIX_LM_LENGTH = 4


# ---------------------------------------------------------------------------
# Length calculus (pure Python; the TF code below uses the same rounding).
# ---------------------------------------------------------------------------

def _noise_counts(tokens_length: int, noise_density: float,
                  mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `tokens_length` tokens (>= 2).

    Python's round() and tf.round both round half to even, so this matches the graph.
    """
    num_noise = min(max(round(tokens_length * noise_density), 1), tokens_length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    num_spans = min(num_spans, num_noise, tokens_length - num_noise)
    return num_noise, num_spans


def _corrupted_lengths(tokens_length: int, noise_density: float,
                       mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths after corruption, both including their EOS."""
    num_noise, num_spans = _noise_counts(tokens_length, noise_density,
                                         mean_noise_span_length)
    inputs = tokens_length - num_noise + num_spans + 1
    targets = num_noise + num_spans + 1
    return inputs, targets


def span_corruption_lengths(*, inputs_length: int,
                            noise_density: float = DEFAULT_NOISE_DENSITY,
                            mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
                            ) -> tuple[int, int]:
    """Returns (tokens_length, targets_length) for an encoder of `inputs_length`.

    tokens_length is the largest number of raw tokens whose corrupted inputs plus EOS
    fit in `inputs_length`; targets_length is the matching noise tokens + sentinels +
    EOS. Example: inputs_length=512 -> (568, 114). These are T5's numbers
    (`random_spans_helper`) at every density, its density-0.5 adjustment included
    (below), except for tiny chunks where T5's helper counts 0 noise tokens or spans
    but its noise mask (and ours) forces at least 1 of each: there we count what the
    mask produces (e.g. inputs 11 at density 0.05: T5 says 11 tokens/2 targets, whose
    corrupted inputs would be 12 long; we give 10/3).

    The search is a linear scan: growing a chunk by one token grows its corrupted
    inputs by 0 or 1 (one more non-noise token, or one more noise token that may or
    may not open a new span), so the corrupted length is monotone in tokens_length.
    """
    if inputs_length < MIN_INPUTS_LENGTH:
        raise errors.ConfigError(
            f"inputs length {inputs_length} is too short for span corruption",
            fix=f"use at least {MIN_INPUTS_LENGTH} tokens (TASK_FEATURE_LENGTHS)")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(
            f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    # Corrupted inputs never exceed tokens_length + 1 (spans <= noise), so
    # inputs_length - 1 always fits; scan upward from there.
    tokens_length = inputs_length - 1
    while _corrupted_lengths(tokens_length + 1, noise_density,
                             mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = _corrupted_lengths(tokens_length, noise_density,
                                           mean_noise_span_length)
    # T5's adjustment (random_spans_helper): at density 0.5 an odd chunk whose extra
    # noise token would make the targets one longer than the inputs loses that token,
    # so targets can be as long as inputs (512 -> 766 tokens, 512/512 rather than
    # 767 tokens, 512/513). The shorter chunk's corrupted lengths are at most these.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# ---------------------------------------------------------------------------
# Small helpers users expect in a seqio Task.
# ---------------------------------------------------------------------------

def lines_to_examples(dataset: tf.data.Dataset, *, key: str = "text") -> tf.data.Dataset:
    """Wraps a dataset of scalar strings (e.g. TextLineDataSource) as {key: line}."""
    return dataset.map(lambda line: {key: line}, num_parallel_calls=tf.data.AUTOTUNE)


def rekey(dataset: tf.data.Dataset, key_map: Mapping[str, str | None]) -> tf.data.Dataset:
    """Renames features: output key -> input key. Keys not listed are dropped;
    an input key of None makes an empty string feature."""
    def fn(ex):
        return {new: (ex[old] if old is not None else tf.constant(""))
                for new, old in key_map.items()}
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _is_blank(text: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.length(tf.strings.strip(text)), 0)


def drop_empty_text(dataset: tf.data.Dataset, *, key: str = "text") -> tf.data.Dataset:
    """Drops examples whose `key` string is empty or whitespace only."""
    return dataset.filter(lambda ex: tf.logical_not(_is_blank(ex[key])))


def count_empty_text(dataset: tf.data.Dataset, *, key: str = "text") -> tuple[int, int]:
    """Returns (total, empty-or-whitespace) counts over a finite dataset.

    A tf.data filter cannot report what it dropped, so this is the eager companion of
    `drop_empty_text` for data checks and tests.
    """
    counts = dataset.map(lambda ex: tf.cast(_is_blank(ex[key]), tf.int64)).reduce(
        (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
        lambda acc, blank: (acc[0] + 1, acc[1] + blank))
    return int(counts[0]), int(counts[1])


def tokenize(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], *,
             text_key: str = "text", output_key: str = "targets") -> tf.data.Dataset:
    """Encodes `text_key` with the `output_key` feature's vocabulary into int32 ids.

    The text feature is replaced by the token ids (other features are kept).
    """
    vocab = output_features[output_key].vocabulary

    def fn(ex):
        ex = dict(ex)
        ex[output_key] = tf.cast(vocab.encode_tf(ex.pop(text_key)), tf.int32)
        return ex
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def concatenate_and_split(dataset: tf.data.Dataset, *, length: int,
                          key: str = "targets", group_size: int = 64) -> tf.data.Dataset:
    """Concatenates the `key` token lists of consecutive examples and cuts the stream
    into chunks of `length` (only the very last chunk of a finite dataset is shorter).

    Other features are dropped: a chunk no longer belongs to one example. Works on
    groups of `group_size` documents at a time with a carried remainder (a tf.data
    scan), because streaming single tokens (unbatch().batch()) is several times slower.
    """
    def stream():  # (tokens of a group of documents, is_final_flush)
        tokens = dataset.map(lambda ex: ex[key], num_parallel_calls=tf.data.AUTOTUNE)
        groups = tokens.ragged_batch(group_size).map(lambda r: (r.flat_values, False))
        flush = tf.data.Dataset.from_tensors((tf.zeros([0], tokens.element_spec.dtype),
                                              True))
        return groups.concatenate(flush)

    def step(carry, group):
        tokens, final = group
        buffer = tf.concat([carry, tokens], axis=0)
        num_full = tf.size(buffer) // length
        rest = tf.size(buffer) - num_full * length
        row_lengths = tf.fill([num_full], length)
        if_tail = tf.logical_and(final, rest > 0)
        row_lengths = tf.concat([row_lengths, tf.fill([tf.cast(if_tail, tf.int32)], rest)], 0)
        used = tf.reduce_sum(row_lengths)
        chunks = tf.RaggedTensor.from_row_lengths(buffer[:used], row_lengths)
        return buffer[used:], chunks

    initial = tf.zeros([0], dataset.element_spec[key].dtype)
    chunks = stream().scan(initial, step).unbatch()
    return chunks.map(lambda chunk: {key: chunk})


def append_eos(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]
               ) -> tf.data.Dataset:
    """Appends EOS (id 1 in seqio vocabularies) to every feature whose add_eos is set."""
    def fn(ex):
        ex = dict(ex)
        for name, feature in output_features.items():
            if name in ex and feature.add_eos:
                eos = tf.constant([feature.vocabulary.eos_id], ex[name].dtype)
                ex[name] = tf.concat([ex[name], eos], axis=0)
        return ex
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def trim_and_append_eos(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                        output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Cuts each feature to its sequence length, keeping room for a final EOS.

    For fine-tuning-style tasks (one example per document): a too-long document is
    truncated, and still ends in EOS when the feature's add_eos is set, so the model
    never learns that sequences stop without one.
    """
    def fn(ex):
        ex = dict(ex)
        for name, feature in output_features.items():
            if name not in ex or name not in (sequence_length or {}):
                continue
            keep = sequence_length[name] - (1 if feature.add_eos else 0)
            ex[name] = ex[name][:keep]
            if feature.add_eos:
                eos = tf.constant([feature.vocabulary.eos_id], ex[name].dtype)
                ex[name] = tf.concat([ex[name], eos], axis=0)
        return ex
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _ensure_tokens(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                   *, objective: str) -> tf.data.Dataset:
    """Text lines, a 'text' feature or token ids in 'targets' -> {'targets': ids}."""
    if isinstance(dataset.element_spec, tf.TensorSpec):
        dataset = lines_to_examples(dataset, key="text")
    spec = dataset.element_spec
    if "text" in spec and spec["text"].dtype == tf.string:
        dataset = drop_empty_text(dataset, key="text")
        return tokenize(dataset, output_features, text_key="text", output_key="targets")
    if "targets" not in spec:
        raise ValueError(f"{objective} needs a 'text' string feature or pre-tokenized "
                         f"'targets'; got features {sorted(spec)}")
    return dataset


# ---------------------------------------------------------------------------
# Noise masks and sentinels.
# ---------------------------------------------------------------------------

def _random_composition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Uniformly random split of `total` items into `parts` non-empty runs: int32 [parts].

    Choose parts-1 distinct cut points among the total-1 gaps between items.
    """
    gaps_order = tf.argsort(tf.random.stateless_uniform([total - 1], seed=seed))
    cuts = tf.sort(gaps_order[: parts - 1] + 1)
    edges = tf.concat([[0], cuts, [total]], axis=0)
    return edges[1:] - edges[:-1]


def random_noise_mask(length: tf.Tensor | int, *, seed: tf.Tensor,
                      noise_density: float = DEFAULT_NOISE_DENSITY,
                      mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
                      ) -> tf.Tensor:
    """bool [length] noise mask (length >= 2) with the counts of `_noise_counts`.

    The sequence alternates non-noise and noise runs, starting with non-noise and
    ending with noise (T5's layout); both run lengths are uniformly random
    compositions. So the first token is never noise and the last always is: noise is
    even across the interior (~0.135 per position for 141 tokens) and denser in the
    last tenth of a chunk (~0.3), a property T5's objective shares.
    `seed` is a stateless seed (shape [2]).
    """
    length = tf.cast(length, tf.int32)
    length_f = tf.cast(length, tf.float64)
    num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length),
                        tf.int32)
    num_spans = tf.minimum(tf.maximum(num_spans, 1),
                           tf.minimum(num_noise, length - num_noise))
    noise_seed, keep_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    noise_runs = _random_composition(num_noise, num_spans, noise_seed)
    keep_runs = _random_composition(length - num_noise, num_spans, keep_seed)
    runs = tf.reshape(tf.stack([keep_runs, noise_runs], axis=1), [-1])
    run_starts = tf.cumsum(runs)[:-1]
    run_id = tf.cumsum(tf.scatter_nd(run_starts[:, None], tf.ones_like(run_starts),
                                     [length]))
    return tf.equal(run_id % 2, 1)


def replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor, *,
                                 first_sentinel: int) -> tf.Tensor:
    """Each run of masked tokens becomes one sentinel; the k-th run (from 0) gets
    first_sentinel - k. Unmasked tokens are kept in order."""
    previous = tf.concat([[False], mask[:-1]], axis=0)
    starts = tf.logical_and(mask, tf.logical_not(previous))
    sentinels = first_sentinel - (tf.cumsum(tf.cast(starts, tokens.dtype)) - 1)
    replaced = tf.where(starts, sentinels, tokens)
    return tf.boolean_mask(replaced, tf.logical_or(tf.logical_not(mask), starts))


def _corrupt_chunks(dataset: tf.data.Dataset, *, first_sentinel: int, noise_density: float,
                    mean_noise_span_length: float, key: str) -> tf.data.Dataset:
    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(ex, seed):
        tokens = ex[key]
        mask = random_noise_mask(tf.size(tokens), seed=tf.convert_to_tensor(seed),
                                 noise_density=noise_density,
                                 mean_noise_span_length=mean_noise_span_length)
        return {
            "inputs": replace_spans_with_sentinels(tokens, mask,
                                                   first_sentinel=first_sentinel),
            "targets": replace_spans_with_sentinels(tokens, tf.logical_not(mask),
                                                    first_sentinel=first_sentinel),
        }
    return corrupt(dataset)


# ---------------------------------------------------------------------------
# The whole objective as one seqio preprocessor.
# ---------------------------------------------------------------------------

def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature], *,
                    noise_density: float = DEFAULT_NOISE_DENSITY,
                    mean_noise_span_length: float = DEFAULT_MEAN_NOISE_SPAN_LENGTH,
                    ) -> tf.data.Dataset:
    """T5 span corruption, usable directly as a seqio Task preprocessor.

    Accepts any of: scalar text lines (as from `seqio.TextLineDataSource`), examples
    with a string 'text' feature, or examples whose 'targets' already hold token ids
    (e.g. after `tokenize` and a `seqio.CacheDatasetPlaceholder`). Emits int32
    'inputs' and 'targets' that fit `sequence_length` exactly (EOS included when the
    feature's add_eos is set).
    """
    if sequence_length is None or "inputs" not in sequence_length:
        raise ValueError("span_corruption needs sequence_length['inputs'] "
                         f"(got {sequence_length!r})")
    tokens_length, targets_length = span_corruption_lengths(
        inputs_length=sequence_length["inputs"], noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length)
    if not output_features["targets"].add_eos:
        targets_length -= 1
    if sequence_length.get("targets", targets_length) < targets_length:
        raise errors.ConfigError(
            f"targets length {sequence_length['targets']} is too short for span "
            f"corruption with inputs length {sequence_length['inputs']}: it needs "
            f"{targets_length} (noise tokens + sentinels + EOS); targets would be cut",
            fix=f"set the targets length to at least {targets_length} "
            "(TASK_FEATURE_LENGTHS)")

    vocabulary = output_features["targets"].vocabulary
    _, max_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
    sentinels = getattr(vocabulary, "extra_ids", None)
    if sentinels is not None and max_spans > sentinels:
        raise errors.ConfigError(
            f"span corruption at inputs length {sequence_length['inputs']}, noise density "
            f"{noise_density} and mean span {mean_noise_span_length} makes {max_spans} noise "
            f"spans per example, but the vocabulary has only {sentinels} sentinel ids "
            "(extra_ids): the others would reuse ordinary tokens",
            fix=f"use a vocabulary with extra_ids >= {max_spans} "
            "(vocabularies.sentencepiece(extra_ids=...)) or a longer mean_noise_span_length")

    dataset = _ensure_tokens(dataset, output_features, objective="span_corruption")
    dataset = concatenate_and_split(dataset, length=tokens_length, key="targets")
    # A finite stream can end in a 1-token chunk, which has no room for noise.
    dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= 2)
    dataset = _corrupt_chunks(
        dataset, first_sentinel=vocabulary.vocab_size - 1,
        noise_density=noise_density, mean_noise_span_length=mean_noise_span_length,
        key="targets")
    return append_eos(dataset, output_features)


def causal_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Causal LM (GPT-style), usable directly as a seqio Task preprocessor.

    Every document gets an EOS (when 'targets' has add_eos), documents are
    concatenated and cut into chunks of exactly sequence_length['targets'] tokens
    (only the last chunk of a finite stream is shorter). Attention is not reset at
    EOS inside a chunk: the EOS is how the model learns where a document ended.
    Emits int32 'targets' only; pair it with the 'lm' feature converter.
    """
    length = (sequence_length or {}).get("targets")
    if length is None:
        raise ValueError(f"causal_lm needs sequence_length['targets'] (got {sequence_length!r})")
    if length < MIN_LM_LENGTH:
        raise errors.ConfigError(
            f"targets length {length} is too short for causal LM",
            fix=f"use at least {MIN_LM_LENGTH} tokens (TASK_FEATURE_LENGTHS)")
    dataset = _ensure_tokens(dataset, output_features, objective="causal_lm")
    dataset = dataset.map(lambda ex: {"targets": ex["targets"]})
    dataset = append_eos(dataset, {"targets": output_features["targets"]})
    return concatenate_and_split(dataset, length=length, key="targets")


def prefix_lm_tokens_length(*, inputs_length: int, targets_length: int) -> int:
    """Raw tokens per prefix-LM chunk: min(inputs, targets) - 2.

    With a split point s in [1, n-1], the prefix (s + EOS) and suffix (n - s + EOS)
    always fit their lengths, and for inputs == targets == L two maximal examples
    (n + 2 tokens each) exactly fill one packed decoder row of 2L.
    """
    n = min(inputs_length, targets_length) - 2
    if min(inputs_length, targets_length) < MIN_PREFIX_LM_LENGTH:
        raise errors.ConfigError(
            f"feature lengths inputs={inputs_length}, targets={targets_length} are too "
            "short for prefix LM",
            fix=f"make both at least {MIN_PREFIX_LM_LENGTH} (TASK_FEATURE_LENGTHS)")
    return n


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Prefix LM, usable directly as a seqio Task preprocessor.

    The token stream is cut into chunks of `prefix_lm_tokens_length` tokens; each
    chunk is split at a uniformly random point s in [1, n-1] (seeded per example, as
    span corruption is) into 'inputs' = chunk[:s] and 'targets' = chunk[s:], each
    followed by EOS when its feature's add_eos is set. With the 'prefix_lm' feature
    converter the prefix is attended bidirectionally and only the suffix carries
    loss; with 'enc_dec' the prefix is the encoder input (T5's prefix-LM objective).
    """
    if not sequence_length or "inputs" not in sequence_length \
            or "targets" not in sequence_length:
        raise ValueError("prefix_lm needs sequence_length['inputs'] and ['targets'] "
                         f"(got {sequence_length!r})")
    n = prefix_lm_tokens_length(inputs_length=sequence_length["inputs"],
                                targets_length=sequence_length["targets"])
    dataset = _ensure_tokens(dataset, output_features, objective="prefix_lm")
    dataset = concatenate_and_split(dataset, length=n, key="targets")
    dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= 2)

    @seqio.map_over_dataset(num_seeds=1)
    def split(ex, seed):
        tokens = ex["targets"]
        at = tf.random.stateless_uniform([], seed=tf.convert_to_tensor(seed), minval=1,
                                         maxval=tf.size(tokens), dtype=tf.int32)
        return {"inputs": tokens[:at], "targets": tokens[at:]}
    return append_eos(split(dataset), output_features)


# ---------------------------------------------------------------------------
# The objectives a task can be registered with (user_tasks.py, data/tasks.py).
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """A pretraining objective: its seqio preprocessor and the features it emits
    (the feature converter must consume exactly these: see data/converters.py)."""
    preprocessor: Callable[..., tf.data.Dataset]
    features: tuple[str, ...]


OBJECTIVES: dict[str, Objective] = {
    "span_corruption": Objective(preprocessor=span_corruption,
                                 features=("inputs", "targets")),
    "lm": Objective(preprocessor=causal_lm, features=("targets",)),
    "prefix_lm": Objective(preprocessor=prefix_lm, features=("inputs", "targets")),
}
