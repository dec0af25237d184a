"""Register a supervised text-to-text task (for fine-tuning), with its metrics.

Pretraining tasks (user_tasks.py) make inputs and targets from raw text by an
objective; a fine-tuning task is given both: one example per record, 'inputs' ->
'targets', each tokenized, trimmed to its length and ended by EOS. The task also
says how it is scored: seqio `metric_fns` on the decoded, postprocessed model output
(by name, see text_metrics.METRICS, or as functions) and a `postprocess_fn` applied
to predictions and targets alike. The targets' original text is kept as
'targets_pretokenized', which seqio's evaluator compares against.

    from t5x_like.data import text_to_text
    MIXTURE_OR_TASK_NAME = @text_to_text.register_tsv_task()
    text_to_text.register_tsv_task:
      name = 'my_task'
      patterns = {'train': '/data/train.tsv', 'validation': '/data/dev.tsv'}
      metric_fns = ['exact_match', 'rouge_l']

The bundled examples are `pydocs_section_titles` and `pydocs_code_names`
(data/tasks.py). Use the 'enc_dec' feature converter (or 'prefix_lm' for a
decoder-only model).

Tasks mixed for multi-task training need an `input_prefix` (T5's 'summarize: ',
'translate English to German: ') wherever two of them could receive the same input:
the prefix, prepended to the input text before tokenizing, tells the model which
answer is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

from t5x_like.data import preprocessors, sources, text_metrics, vocabularies

FEATURES = ("inputs", "targets")
_CHECK_BATCH = 256


def split_tsv(dataset: tf.data.Dataset, *, label: str) -> tf.data.Dataset:
    """{'text': 'input<TAB>target'} -> {'inputs', 'targets'}; lines without a tab (or
    with an empty side) are dropped and counted as 'not_input_tab_target'."""
    def count(ok, lines):
        ok = ok.numpy()
        if not ok.all():
            sources.record_skips(label, "not_input_tab_target", int((~ok).sum()),
                                 lines.numpy()[~ok][0])
        return ok

    def check(lines):
        parts = tf.strings.split(lines, "\t", maxsplit=1).to_tensor(default_value="")
        parts = tf.pad(parts, [[0, 0], [0, 2 - tf.shape(parts)[1]]])
        ok = tf.logical_and(tf.strings.length(tf.strings.strip(parts[:, 0])) > 0,
                            tf.strings.length(tf.strings.strip(parts[:, 1])) > 0)
        keep = tf.py_function(count, [ok, lines], tf.bool)
        keep.set_shape(ok.shape)
        kept = tf.boolean_mask(parts, keep)
        return tf.data.Dataset.from_tensor_slices({"inputs": kept[:, 0],
                                                   "targets": kept[:, 1]})
    return dataset.map(lambda ex: ex["text"]).batch(_CHECK_BATCH).flat_map(check)


def prefix_inputs(dataset: tf.data.Dataset, *, prefix: str) -> tf.data.Dataset:
    """'inputs' text -> prefix + 'inputs' (the task's name for the model)."""
    return dataset.map(lambda ex: {**ex, "inputs": tf.strings.join([prefix, ex["inputs"]])})


def register_task(*, name: str, source: seqio.DataSource,
                  preprocess: Sequence[Callable[..., tf.data.Dataset]] = (),
                  vocabulary: seqio.Vocabulary | None = None,
                  metric_fns: Sequence[str | text_metrics.MetricFn] = ("exact_match",),
                  postprocess_fn: Callable[..., str] = text_metrics.normalize_whitespace,
                  shuffle_buffer_size: int = 1000) -> str:
    """Registers `name` over a source whose examples (after `preprocess`) carry
    'inputs' and 'targets' strings; returns the name (usable as a gin value).

    metric_fns: names from text_metrics.METRICS or seqio metric functions; an
      unknown name or a function with the wrong arguments is an error now.
    """
    vocabulary = vocabulary or vocabularies.default()
    features = {f: seqio.Feature(vocabulary=vocabulary, add_eos=True) for f in FEATURES}
    resolved = text_metrics.resolve(metric_fns)
    if name in seqio.TaskRegistry.names():       # re-running a gin file is harmless
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            *preprocess,
            seqio.preprocessors.tokenize,          # keeps '<feature>_pretokenized'
            preprocessors.trim_and_append_eos,
        ],
        output_features=features,
        metric_fns=resolved,
        postprocess_fn=postprocess_fn,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name


def register_tsv_task(*, name: str, patterns: sources.Patterns,
                      vocabulary: seqio.Vocabulary | None = None,
                      metric_fns: Sequence[str | text_metrics.MetricFn] = ("exact_match",),
                      postprocess_fn: Callable[..., str] = text_metrics.normalize_whitespace,
                      input_prefix: str = "") -> str:
    """Tab-separated files, one example per line: input <TAB> target (UTF-8).

    Undecodable, blank or tab-less lines are skipped and counted (README, "Your own
    data"). `patterns`: {split: glob(s)}, e.g. {'train': ..., 'validation': ...}.
    input_prefix: text put before every input, e.g. 'code name: ' (module docstring).
    """
    return register_task(
        name=name, source=sources.text_files(patterns=patterns),
        preprocess=[lambda ds: sources.clean_text(ds, label=name),
                    lambda ds: split_tsv(ds, label=name),
                    *([lambda ds: prefix_inputs(ds, prefix=input_prefix)]
                      if input_prefix else [])],
        vocabulary=vocabulary, metric_fns=metric_fns, postprocess_fn=postprocess_fn)

