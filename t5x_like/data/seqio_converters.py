"""The real seqio feature converter of a `converters` entry, with a soft prompt's
placeholders when the run prompt-tunes.

Training, teacher-forced eval (`pipeline.SeqioDataSource`) and prediction metrics
(`task_eval.PredictionMetrics`) all build their converter here, so the three see
the same batches. With `soft_prompt_length` N, every example's `inputs` gain N
`converters.SOFT_PROMPT_ID` tokens in front after the task has trimmed them to
TASK_FEATURE_LENGTHS, before packing: the example keeps all its own tokens, and a
packed row carries one prompt per example. The model writes its learned vectors
over them (finetuning/prompt_tuning.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from t5x_like.data import converters


class _SoftPromptPlaceholders(seqio.FeatureConverter):
    """Another converter, fed inputs that start with N placeholder tokens.

    Delegates as seqio's own DecoderFeatureConverter does: the wrapped converter's
    `__call__` runs its validations on the lengthened inputs.
    """

    def __init__(self, converter: seqio.FeatureConverter, *, length: int):
        self.TASK_FEATURES = converter.TASK_FEATURES
        self.MODEL_FEATURES = converter.MODEL_FEATURES
        self.PACKING_FEATURE_DTYPES = converter.PACKING_FEATURE_DTYPES
        super().__init__(pack=converter.pack)
        self._converter = converter
        self._length = length

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        placeholders = tf.fill([self._length], tf.constant(converters.SOFT_PROMPT_ID,
                                                           ds.element_spec["inputs"].dtype))

        def prepend(example):
            return {**example, "inputs": tf.concat([placeholders, example["inputs"]], 0)}
        return self._converter(
            ds.map(prepend, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True),
            converters.with_soft_prompt(task_feature_lengths, self._length))

    def _convert_features(self, ds, task_feature_lengths):
        # Abstract in seqio.FeatureConverter, so it must exist; `__call__` delegates
        # to the wrapped converter and never reaches it.
        raise NotImplementedError("delegated in __call__")

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> Mapping[str, int]:
        return self._converter.get_model_feature_lengths(
            converters.with_soft_prompt(task_feature_lengths, self._length))


def build(name: str, *, pack: bool, soft_prompt_length: int = 0) -> seqio.FeatureConverter:
    """The seqio converter `name` ('enc_dec', 'lm', 'prefix_lm'), packing or not."""
    spec = converters.get(name)
    converters.check_soft_prompt(name, soft_prompt_length)
    converter = getattr(seqio, spec.seqio_class)(pack=pack, **spec.seqio_kwargs)
    if soft_prompt_length:
        converter = _SoftPromptPlaceholders(converter, length=soft_prompt_length)
    return converter
