"""Teacher-forced evaluation: the eval step, its metrics, and the evaluator.

`train()` calls a `TeacherForcedEvaluator` every `eval_every_steps` (in-loop eval);
`launch.eval` calls the same one for each checkpoint it evaluates. For every task
(each member of a mixture separately) it scores the first `num_batches` batches of
the validation split, read once and kept in memory, so every evaluation sees the
same tokens and no evaluation touches the training data iterator, its RNG or the
train state: turning eval on leaves every training loss bitwise unchanged.

Metrics, per real target token of all those batches together (sums divided once, not
a mean of per-batch means):
  loss           cross-entropy + z-loss (the training loss without label smoothing)
  cross_entropy  -log p(target token), the model's own uncertainty
  perplexity     exp(cross_entropy)
  accuracy       share of target tokens that are the argmax of their logits
  target_tokens  how many tokens these numbers average over
They are the same whatever the training loss's normalisation ('sequences',
'total_tokens') or label smoothing, so runs with different loss settings compare.

The step is jitted with the parameters' shardings and the batch sharding, and
donates nothing: the state it reads goes on training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from t5x_like import errors, storage
from t5x_like.reporting import metrics as metrics_lib
from t5x_like.parallel import partitioning
from t5x_like.data import host_batches
from t5x_like.data.contract import DataSource
from t5x_like.models.trainable import Model

log = logging.getLogger(__name__)

# Metric sums every model returns from loss_and_metrics (see models/losses.py).
SUM_KEYS = ("loss_sum", "z_loss_sum", "accuracy_sum", "weight_sum")


def per_token_model(model: Model) -> Model:
    """The model with its loss per real target token and without label smoothing.

    Evaluation reports per-token numbers whatever the training settings; the
    model's own dataclass fields say how its loss is normalised (models/losses.py).
    """
    if not dataclasses.is_dataclass(model):
        return model
    fields = {f.name for f in dataclasses.fields(model)}
    changes = {name: value for name, value in (("loss_normalization", "tokens"),
                                               ("label_smoothing", 0.0))
               if name in fields}
    return dataclasses.replace(model, **changes) if changes else model


def make_eval_step(model: Model) -> Callable[[Any, Mapping[str, jax.Array]], dict]:
    """`(params, batch) -> metric sums` (SUM_KEYS): no dropout, per-token weights."""
    model = per_token_model(model)

    def eval_step(params, batch):
        _, sums = model.loss_and_metrics(params, batch, dropout_rng=None)
        return {key: sums[key] for key in SUM_KEYS}
    return eval_step


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Metric sums over any number of batches -> the reported metrics."""
    tokens = float(sums["weight_sum"])
    divisor = max(tokens, 1.0)
    cross_entropy = (float(sums["loss_sum"]) - float(sums["z_loss_sum"])) / divisor
    return {"loss": float(sums["loss_sum"]) / divisor,
            "cross_entropy": cross_entropy,
            "perplexity": math.exp(min(cross_entropy, 700.0)),   # no float overflow
            "accuracy": float(sums["accuracy_sum"]) / divisor,
            "target_tokens": tokens}


def jit_eval_step(model: Model, *, partitioner: partitioning.Partitioner,
                  param_shardings: Any, batch_feature_names: tuple[str, ...]
                  ) -> Callable[[Any, Mapping[str, jax.Array]], dict]:
    """The eval step under jit with explicit shardings, nothing donated."""
    batch_shardings = {name: partitioner.batch_sharding() for name in batch_feature_names}
    return partitioner.jit(make_eval_step(model), in_shardings=(param_shardings, batch_shardings),
                           out_shardings=partitioner.replicated())


def format_line(step: int, task: str, metrics: Mapping[str, float]) -> str:
    return (f"eval step {step} | {task} | loss {metrics['loss']:.4f} | "
            f"acc {metrics['accuracy']:.3f} | ppl {metrics['perplexity']:.2f} | "
            f"{metrics['target_tokens']:,.0f} target tokens")


class TeacherForcedEvaluator:
    """Loss, accuracy and perplexity per task on fixed validation batches.

    The batches (`num_batches` global batches per task, from the start of each
    task's validation split) are read when the evaluator is built and reused at
    every evaluation. Every process reads them whole, as one data shard, and keeps
    the rows its devices hold (partitioning.batch_block): the eval batches are then
    the same on any number of processes and whatever the training's `num_data_shards`, so in-loop eval and launch.eval
    report the same numbers for the same parameters. (Eval data is small; reading
    it on every host costs little.) TensorBoard scalars go to `<logdir>/<task>`.
    """

    def __init__(self, *, model: Model, sources: Mapping[str, DataSource],
                 partitioner: partitioning.Partitioner, param_shardings: Any,
                 batch_feature_names: tuple[str, ...], batch_size: int, num_batches: int,
                 logdir: str | None):
        if num_batches < 1:
            raise errors.ConfigError(f"eval_batches must be >= 1, got {num_batches}",
                                     fix="set train_loop.train.eval_batches to 1 or more")
        if not sources:
            raise errors.ConfigError("no task to evaluate: none has a validation split",
                                     fix="give the task a validation split, or set "
                                     "train_loop.train.eval_every_steps=0")
        self._partitioner = partitioner
        self._step = jit_eval_step(model, partitioner=partitioner,
                                   param_shardings=param_shardings,
                                   batch_feature_names=batch_feature_names)
        block = partitioning.batch_block(partitioner)
        if batch_size % block.count:
            raise errors.ConfigError(f"eval batch size {batch_size} does not divide evenly "
                                     f"over {block.count} blocks of batch rows (processes)",
                                     fix="use a batch size that is a multiple of the "
                                     "process count")
        rows = batch_size // block.count
        mine = slice(block.index * rows, (block.index + 1) * rows)
        self._batches = {}
        for task, source in sources.items():
            whole = host_batches.HostBatches(source, global_batch_size=batch_size,
                                             num_data_shards=1, process_index=0,
                                             process_count=1, start_step=0)
            self._batches[task] = [{name: value[mine] for name, value in next(whole).items()}
                                   for _ in range(num_batches)]
        self._writers = {}
        if logdir is not None and jax.process_index() == 0:
            self._writers = {task: metrics_lib.TensorBoardWriter(
                logdir=storage.join(logdir, task)) for task in sources}

    @property
    def tasks(self) -> list[str]:
        return list(self._batches)

    def evaluate(self, step: int, params: Any) -> dict[str, dict[str, float]]:
        """{task: metrics} for `params`; logged, and written to TensorBoard at `step`."""
        results = {}
        for task, batches in self._batches.items():
            sums = dict.fromkeys(SUM_KEYS, 0.0)
            for batch in batches:
                batch_sums = jax.device_get(self._step(
                    params, partitioning.global_batch(batch, self._partitioner)))
                for key in SUM_KEYS:
                    sums[key] += float(np.asarray(batch_sums[key], np.float64))
            results[task] = summarize(sums)
            log.info(format_line(step, task, results[task]))
            if task in self._writers:
                self._writers[task].write_scalars(step, results[task])
        return results

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def evaluator_for_run(*, run: Any, partitioner: partitioning.Partitioner,
                      param_shardings: Any, num_batches: int, logdir: str | None,
                      split: str = "validation") -> TeacherForcedEvaluator:
    """The evaluator of a RunConfig: its training source's `split`, task by task."""
    data = run.train_data
    if not hasattr(data, "eval_sources"):
        raise errors.ConfigError(f"the run's train_data ({type(data).__name__}) cannot give "
                                 "validation data (it has no eval_sources)",
                                 fix="set train_loop.train.eval_every_steps=0")
    sources = data.eval_sources(split=split)
    return TeacherForcedEvaluator(
        model=run.model, sources=sources, partitioner=partitioner,
        param_shardings=param_shardings,
        batch_feature_names=tuple(data.model_feature_lengths()), batch_size=run.batch_size,
        num_batches=num_batches, logdir=logdir)
