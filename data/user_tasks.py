"""Register a seqio task for your own data, from Python or gin, in one call.

Each `register_*` function builds a task (source -> counted cleaning -> tokenize ->
[cache point] -> objective) and returns its name, so gin can use the call directly
as the run's task:

    from __gin__ import dynamic_registration
    from data import user_tasks
    from t5x_like import vocabularies

    MIXTURE_OR_TASK_NAME = @user_tasks.register_text_task()
    user_tasks.register_text_task:
      name = 'my_corpus'
      patterns = {'train': '/data/train-*.txt', 'validation': '/data/valid.txt'}
      objective = 'span_corruption'      # or 'lm', 'prefix_lm'
      vocabulary = @vocabularies.sentencepiece()
    vocabularies.sentencepiece.path = '/vocabs/t5_32k.model'

Objectives and the feature converter (SeqioDataSource.feature_converter) they need:
  span_corruption  'inputs'/'targets'   'enc_dec' (or 'prefix_lm')
  prefix_lm        'inputs'/'targets'   'prefix_lm' or 'enc_dec'
  lm               'targets'            'lm'
Re-registering a name replaces the old task, so re-running a gin file is harmless.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import seqio

from t5x_like import data_sources, preprocessors, vocabularies

OBJECTIVES = {
    "span_corruption": preprocessors.span_corruption,
    "lm": preprocessors.causal_lm,
    "prefix_lm": preprocessors.prefix_lm,
}
# Chunks are shuffled after the objective; ~1000 mixes many documents in little memory.
SHUFFLE_BUFFER_SIZE = 1000


def output_features(objective: str, vocabulary: seqio.Vocabulary
                    ) -> dict[str, seqio.Feature]:
    """The task features an objective emits (all int32 token ids, EOS-terminated)."""
    _check_objective(objective)
    names = ("targets",) if objective == "lm" else ("inputs", "targets")
    return {n: seqio.Feature(vocabulary=vocabulary, add_eos=True) for n in names}


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")


def _replace(registry, name: str) -> None:
    if name in registry.names():
        registry.remove(name)


def _cache_in_memory(dataset):
    return dataset.cache()


def register_task(*, name: str, source: seqio.DataSource, objective: str,
                  vocabulary: seqio.Vocabulary | None = None, text_feature: str = "text",
                  shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
                  cache_tokenized_in_memory: bool = False) -> str:
    """Registers `name` over any seqio source whose examples carry a text feature.

    cache_tokenized_in_memory: keep this host's tokenized documents in RAM after the
      first epoch (4 bytes per token), so later epochs skip reading and
      SentencePiece: about 2x the span-corruption throughput on 2 cores (see
      benchmarks/RESULTS.md). For corpora that fit in memory; at C4 scale, use seqio's
      offline cache (`use_cached=True`) instead. Epochs then reuse the first
      epoch's file order (chunking, masks and the example shuffle still change).
    """
    _check_objective(objective)
    vocabulary = vocabulary or vocabularies.default()
    _replace(seqio.TaskRegistry, name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(data_sources.clean_text, key=text_feature, label=name),
            functools.partial(preprocessors.rekey, key_map={"text": text_feature}),
            preprocessors.tokenize,  # 'text' -> 'targets' token ids
            *([_cache_in_memory] if cache_tokenized_in_memory else []),
            seqio.CacheDatasetPlaceholder(),
            # After seqio's repeat: fresh chunking and randomness every epoch.
            OBJECTIVES[objective],
        ],
        output_features=output_features(objective, vocabulary),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name


def register_text_task(*, name: str, patterns: data_sources.Patterns, objective: str,
                       vocabulary: seqio.Vocabulary | None = None,
                       cache_tokenized_in_memory: bool = False) -> str:
    """Plain-text files, one document per line. `patterns`: a glob, a list of globs, or
    {split: glob(s)} (a bare glob is the 'train' split)."""
    return register_task(name=name, source=data_sources.text_files(patterns=patterns),
                         objective=objective, vocabulary=vocabulary,
                         cache_tokenized_in_memory=cache_tokenized_in_memory)


def register_jsonl_task(*, name: str, patterns: data_sources.Patterns, objective: str,
                        field: str = "text",
                        vocabulary: seqio.Vocabulary | None = None,
                        cache_tokenized_in_memory: bool = False) -> str:
    """JSON Lines files; the document is each object's string `field`."""
    source = data_sources.jsonl_files(patterns=patterns, field=field, label=name)
    return register_task(name=name, source=source, objective=objective,
                         vocabulary=vocabulary,
                         cache_tokenized_in_memory=cache_tokenized_in_memory)


def register_tfrecord_task(*, name: str, patterns: data_sources.Patterns, objective: str,
                           feature: str = "text", compression_type: str | None = None,
                           vocabulary: seqio.Vocabulary | None = None,
                           cache_tokenized_in_memory: bool = False) -> str:
    """TFRecord files of tf.train.Example with a bytes `feature`."""
    source = data_sources.tfrecord_files(patterns=patterns, feature=feature,
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
    source = data_sources.tfds_dataset(name=tfds_name, data_dir=data_dir, splits=splits)
    return register_task(name=name, source=source, objective=objective,
                         vocabulary=vocabulary, text_feature=feature)


def register_mixture(*, name: str, rates: Mapping[str, float]) -> str:
    """A seqio mixture sampling registered tasks in proportion to `rates`.

    The tasks must emit the same features with the same vocabulary (e.g. span
    corruption + prefix LM, both inputs/targets).
    """
    unknown = sorted(set(rates) - set(seqio.TaskRegistry.names()))
    if unknown:
        raise ValueError(f"mixture {name!r}: unknown tasks {unknown}; register them first")
    if not rates or any(r <= 0 for r in rates.values()):
        raise ValueError(f"mixture {name!r}: rates must be positive, got {dict(rates)}")
    _replace(seqio.MixtureRegistry, name)
    seqio.MixtureRegistry.add(name, list(rates.items()))
    return name
