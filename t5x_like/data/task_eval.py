"""A task's own metrics (seqio `metric_fns`) on a model's predictions, through seqio.

`PredictionMetrics` wraps `seqio.Evaluator`, which T5X uses for the same job: for
every task of a mixture that defines metric functions, it reads the split once
(unshuffled, unpacked, at the run's task lengths) and keeps it in memory; at each
`evaluate` it hands the model features to our prediction function a batch at a
time, decodes the returned token ids with the task's vocabulary, applies the task's
`postprocess_fn` to predictions and targets ('targets_pretokenized', the original
text), and calls each metric function. Metrics of `(targets, scores)` get each
example's log-likelihood from the score function instead.

The prediction functions are the core's (t5x_like/evaluation/predictions.py): `fn(params,
batch) -> one result per row` on fixed-size batches; the last batch is padded with
empty rows, whose results are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import seqio
import tensorflow as tf
from seqio import metrics as seqio_metrics

from t5x_like.data import seqio_converters

log = logging.getLogger(__name__)

BatchFn = Callable[[Mapping[str, np.ndarray]], list]


def _batches(dataset: tf.data.Dataset, batch_size: int):
    """(example indices, features padded to batch_size rows, real rows) of an
    enumerated seqio dataset."""
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
        real = len(indices)
        padded = {name: np.pad(value.astype(np.int32),
                               [(0, batch_size - real)] + [(0, 0)] * (value.ndim - 1))
                  for name, value in features.items()}
        yield indices, padded, real


def _per_example(fn: BatchFn, batch_size: int) -> Callable[[tf.data.Dataset], list]:
    """A batch function -> seqio's model function: [(example index, result)]."""
    def model_fn(dataset: tf.data.Dataset) -> list:
        results = []
        for indices, batch, real in _batches(dataset, batch_size):
            results.extend(zip(indices.tolist(), fn(batch)[:real]))
        return results
    return model_fn


def _padded_tokens(predict: BatchFn, batch_size: int) -> Callable[[tf.data.Dataset], list]:
    """Like _per_example, with every token list padded (PAD = 0, which decodes to
    nothing) to one length: seqio turns the predictions into one 2-D array."""
    model_fn = _per_example(predict, batch_size)

    def padded(dataset: tf.data.Dataset) -> list:
        results = model_fn(dataset)
        width = max([len(tokens) for _, tokens in results] + [1])
        return [(i, list(tokens) + [0] * (width - len(tokens))) for i, tokens in results]
    return padded


class PredictionMetrics:
    """seqio metric_fns of a task (or of each task of a mixture) on predictions."""

    def __init__(self, *, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 feature_converter: str, split: str = "validation",
                 num_examples: int | None = None, soft_prompt_length: int = 0):
        """num_examples: score only the first N examples of each task's split.
        soft_prompt_length: a prompt-tuned model's placeholders before the inputs."""
        converter = seqio_converters.build(feature_converter, pack=False,
                                           soft_prompt_length=soft_prompt_length)
        self._evaluator = seqio.Evaluator(
            mixture_or_task_name=mixture_or_task_name, feature_converter=converter,
            eval_split=split, sequence_length=dict(task_feature_lengths),
            num_examples=num_examples, shuffle=False, use_memory_cache=True,
            async_compute_metrics=False)
        # Predictions need be no longer than the targets the metrics compare them to.
        self.max_target_length = int(task_feature_lengths["targets"])
        self.task_names = [task.name for task in self._evaluator.eval_tasks]
        self.needs_scores = any(task.score_metric_fns for task in self._evaluator.eval_tasks)
        self.needs_predictions = any(task.predict_metric_fns
                                     for task in self._evaluator.eval_tasks)

    def feature_names(self) -> tuple[str, ...]:
        """The model features of a prediction batch (the unpacked converter's)."""
        return tuple(self._evaluator.model_feature_shapes)

    def evaluate(self, *, predict: BatchFn | None, score: BatchFn | None, batch_size: int
                 ) -> tuple[dict[str, dict[str, float]], dict[str, list[tuple[str, str]]]]:
        """({task: {metric: value}}, {task: [(target text, predicted text)]}) with
        `predict(batch)` -> token ids per row (EOS stripped) and `score(batch)` ->
        log-likelihood per row. Texts are as decoded, before `postprocess_fn`."""
        metrics, outputs = self._evaluator.evaluate(
            compute_metrics=True,
            predict_fn=_padded_tokens(predict, batch_size) if predict else None,
            score_fn=_per_example(score, batch_size) if score else None)
        examples = {}
        for task in self._evaluator.eval_tasks:
            tokens = outputs[task.name].get(seqio_metrics.ModelOutputType.PREDICTION)
            if tokens is None:
                continue
            vocabulary = task.output_features["targets"].vocabulary
            targets = [example["targets_pretokenized"].decode("utf-8")
                       if "targets_pretokenized" in example
                       else vocabulary.decode(example["targets"].tolist())
                       for example in self._evaluator.cached_task_datasets[task.name]
                       .as_numpy_iterator()]
            examples[task.name] = [(target, vocabulary.decode([int(t) for t in predicted]))
                                   for target, predicted in zip(targets, tokens)]
        scores = {task: {name: float(value) for name, value in values.items()}
                  for task, values in metrics.result().items()}
        return scores, examples

    def close(self) -> None:
        self._evaluator.close()
