"""Register a seqio task for your own data, from Python or gin, in one call.

Each `register_*` function builds a task (source -> counted cleaning -> tokenize ->
[cache point] -> objective) and returns its name, so gin can use the call directly
as the run's task:

    from __gin__ import dynamic_registration
    from t5x_like.data import user_tasks
    from t5x_like.data import vocabularies

    MIXTURE_OR_TASK_NAME = @user_tasks.register_text_task()
    user_tasks.register_text_task:
      name = 'my_corpus'
      patterns = {'train': '/data/train-*.txt', 'validation': '/data/valid.txt'}
      objective = 'span_corruption'      # or 'lm', 'prefix_lm'
      vocabulary = @vocabularies.sentencepiece()
    vocabularies.sentencepiece.path = '/vocabs/t5_32k.model'

Objectives (`preprocessors.OBJECTIVES`) and the feature converter
(SeqioDataSource.feature_converter) they need:
  span_corruption  'inputs'/'targets'   'enc_dec' (or 'prefix_lm')
  prefix_lm        'inputs'/'targets'   'prefix_lm' or 'enc_dec'
  lm               'targets'            'lm'
Re-registering a name replaces the old task, so re-running a gin file is harmless.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5x_like import errors
from t5x_like.data import preprocessors, sources, vocabularies
# Chunks are shuffled after the objective; ~1000 mixes many documents in little memory.
SHUFFLE_BUFFER_SIZE = 1000


def output_features(objective: str, vocabulary: seqio.Vocabulary
                    ) -> dict[str, seqio.Feature]:
    """The task features an objective emits (all int32 token ids, EOS-terminated)."""
    return {n: seqio.Feature(vocabulary=vocabulary, add_eos=True)
            for n in _objective(objective).features}


def _objective(name: str) -> preprocessors.Objective:
    if name not in preprocessors.OBJECTIVES:
        raise errors.ConfigError(f"unknown objective {name!r}",
                                 fix=f"choose one of {sorted(preprocessors.OBJECTIVES)}")
    return preprocessors.OBJECTIVES[name]


def _replace(registry, name: str) -> None:
    if name in registry.names():
        registry.remove(name)


def _tokens_in_memory(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """This shard's tokenized documents, read once now and replayed from memory.

    Yields what `dataset.cache()` would (the same documents in the same order, every
    epoch), but the tokens are a constant of the pipeline rather than the state of
    a cache iterator, so the input position saved in each checkpoint holds only an
    index into them instead of a copy of the whole cache (3.3 MB per shard for the
    bundled corpus; the corpus size for yours).
    """
    documents = list(dataset.as_numpy_iterator())
    if not documents:          # nothing survived cleaning: let the emptiness check say so
        return dataset
    columns = {key: tf.RaggedTensor.from_row_lengths(
        np.concatenate([d[key] for d in documents]),
        [len(d[key]) for d in documents]) for key in documents[0]}
    return tf.data.Dataset.from_tensor_slices(columns)


def register_task(*, name: str, source: seqio.DataSource, objective: str,
                  vocabulary: seqio.Vocabulary | None = None, text_feature: str = "text",
                  shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
                  cache_tokenized_in_memory: bool = False) -> str:
    """Registers `name` over any seqio source whose examples carry a text feature.

    cache_tokenized_in_memory: read and tokenize this host's documents once, when the
      pipeline is built, and keep them in RAM (4 bytes per token), so epochs skip
      reading and SentencePiece: about 2x the span-corruption throughput on 2 cores
      (see benchmarks/RESULTS.md). For corpora that fit in memory; at C4 scale, use
      seqio's offline cache (`use_cached=True`) instead. Every epoch reuses the
      first epoch's file order (chunking, masks and the example shuffle still change).
    """
    preprocessor = _objective(objective).preprocessor
    vocabulary = vocabulary or vocabularies.default()
    _replace(seqio.TaskRegistry, name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(sources.clean_text, key=text_feature, label=name),
            functools.partial(preprocessors.rekey, key_map={"text": text_feature}),
            preprocessors.tokenize,  # 'text' -> 'targets' token ids
            *([_tokens_in_memory] if cache_tokenized_in_memory else []),
            seqio.CacheDatasetPlaceholder(),
            # After seqio's repeat: fresh chunking and randomness every epoch.
            preprocessor,
        ],
        output_features=output_features(objective, vocabulary),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name


def register_text_task(*, name: str, patterns: sources.Patterns, objective: str,
                       vocabulary: seqio.Vocabulary | None = None,
                       cache_tokenized_in_memory: bool = False) -> str:
    """Plain-text files, one document per line. `patterns`: a glob, a list of globs, or
    {split: glob(s)} (a bare glob is the 'train' split)."""
    return register_task(name=name, source=sources.text_files(patterns=patterns),
                         objective=objective, vocabulary=vocabulary,
                         cache_tokenized_in_memory=cache_tokenized_in_memory)


def register_jsonl_task(*, name: str, patterns: sources.Patterns, objective: str,
                        field: str = "text",
                        vocabulary: seqio.Vocabulary | None = None,
                        cache_tokenized_in_memory: bool = False) -> str:
    """JSON Lines files; the document is each object's string `field`."""
    source = sources.jsonl_files(patterns=patterns, field=field, label=name)
    return register_task(name=name, source=source, objective=objective,
                         vocabulary=vocabulary,
                         cache_tokenized_in_memory=cache_tokenized_in_memory)


def register_tfrecord_task(*, name: str, patterns: sources.Patterns, objective: str,
                           feature: str = "text", compression_type: str | None = None,
                           vocabulary: seqio.Vocabulary | None = None,
                           cache_tokenized_in_memory: bool = False) -> str:
    """TFRecord files of tf.train.Example with a bytes `feature`."""
    source = sources.tfrecord_files(patterns=patterns, feature=feature,
                                         compression_type=compression_type)
    return register_task(name=name, source=source, objective=objective,
                         vocabulary=vocabulary,
                         cache_tokenized_in_memory=cache_tokenized_in_memory)


def register_tfds_task(*, name: str, tfds_name: str, objective: str,
                       data_dir: str | None = None,
                       splits: Iterable[str] | Mapping[str, str] = ("train", "validation"),
                       feature: str = "text",
                       vocabulary: seqio.Vocabulary | None = None) -> str:
    """A prepared TFDS dataset (e.g. tfds_name='c4/en:3.1.0', data_dir='gs://...').

    `splits`: split names, or {our split: TFDS split or slice, e.g. 'train[:90%]'}.
    """
    source = sources.tfds_dataset(name=tfds_name, data_dir=data_dir, splits=splits)
    return register_task(name=name, source=source, objective=objective,
                         vocabulary=vocabulary, text_feature=feature)


def register_mixture(*, name: str, rates: Mapping[str, float]) -> str:
    """A seqio mixture sampling registered tasks in proportion to `rates`.

    The tasks must emit the same features with the same vocabulary (e.g. span
    corruption + prefix LM, both inputs/targets).
    """
    unknown = sorted(set(rates) - set(seqio.TaskRegistry.names()))
    if unknown:
        raise errors.ConfigError(f"mixture {name!r}: unknown tasks {unknown}",
                                 fix="register them first")
    if not rates or any(r <= 0 for r in rates.values()):
        raise errors.ConfigError(f"mixture {name!r}: rates {dict(rates)} are not all "
                                 "positive", fix="give every task a rate > 0")
    _replace(seqio.MixtureRegistry, name)
    seqio.MixtureRegistry.add(name, list(rates.items()))
    return name
