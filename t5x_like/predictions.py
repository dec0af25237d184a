"""What seqio metrics score: a model's token predictions and its log-likelihoods.

A task's `metric_fns` (text_metrics.py) are scored on the model's output decoded to
text. The model's side is a prediction function

    predict_fn(params, batch) -> list[list[int]]

over a batch of seqio model features (the unpacked feature converter's, the same
whole global batch on every process), returning one list of token ids per row with
EOS and everything after it removed. A `Predictor` builds one for a model and mesh
(`bind`); `checkpoint_eval.evaluate_checkpoints.predictor` chooses it in gin, and its
`name` prefixes the scores it produced ('teacher_forced_argmax/exact_match'), so a
number always says how it was made.

  TeacherForcedArgmax  at every target position, the most likely token given the
                       *true* previous target tokens: one forward pass, no decoding.
                       A diagnostic, not generation (it cannot compound its own
                       mistakes), and exactly reproducible; used until a decoding
                       predictor (t5x_like/decoding.py) is wired in with the same
                       `bind` signature.

`log_likelihood_fn` gives each example's log p(targets | inputs) (the sum over its
target tokens) for `score_metric_fns`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from t5x_like import evaluation, partitioning
from t5x_like.trainer import Model

# seqio vocabularies used here reserve id 1 for EOS (data/vocabularies.py).
EOS_ID = 1

PredictFn = Callable[[Any, Mapping[str, np.ndarray]], list[list[int]]]
ScoreFn = Callable[[Any, Mapping[str, np.ndarray]], list[float]]


class Predictor(Protocol):
    name: str

    def bind(self, *, model: Model, partitioner: partitioning.Partitioner,
             param_shardings: Any) -> PredictFn: ...


def global_batch(batch: Mapping[str, np.ndarray], partitioner: partitioning.Partitioner
                 ) -> dict[str, jax.Array]:
    """The same whole batch on every process -> global arrays split over the mesh."""
    return {name: jax.make_array_from_callback(
        value.shape, partitioner.batch_sharding(value.ndim),
        lambda index, value=value: value[index]) for name, value in batch.items()}


def _jit_on_mesh(fn: Callable, *, partitioner: partitioning.Partitioner,
                 param_shardings: Any) -> Callable:
    """`fn(params, batch)` jitted with the params' shardings; replicated output, so
    every process can read all of it."""
    jitted = jax.jit(fn, out_shardings=NamedSharding(partitioner.mesh, PartitionSpec()))

    def call(params, batch):
        with partitioner.context():
            params = jax.device_put(params, param_shardings)
            return np.asarray(jax.device_get(jitted(params, global_batch(batch, partitioner))))
    return call


def strip_after_eos(tokens: np.ndarray) -> list[int]:
    ids = [int(t) for t in tokens]
    return ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherForcedArgmax:
    """Predictions read off one teacher-forced forward pass (see module docstring).

    Needs the model's `logits(params, batch)` (both model families have it).
    """
    name: str = "teacher_forced_argmax"

    def bind(self, *, model: Model, partitioner: partitioning.Partitioner,
             param_shardings: Any) -> PredictFn:
        argmax = _jit_on_mesh(
            lambda params, batch: jnp.argmax(model.logits(params, batch), axis=-1),
            partitioner=partitioner, param_shardings=param_shardings)

        def predict(params, batch):
            tokens_BxL = argmax(params, batch)
            is_target_BxL = np.asarray(batch["decoder_loss_weights"]) > 0
            return [strip_after_eos(row[mask]) for row, mask in zip(tokens_BxL, is_target_BxL)]
        return predict


def log_likelihood_fn(*, model: Model, partitioner: partitioning.Partitioner,
                      param_shardings: Any) -> ScoreFn:
    """`(params, batch) -> [log p(targets) per row]`: minus the summed cross-entropy
    of each row's target tokens (no z-loss, no label smoothing)."""
    eval_step = evaluation.make_eval_step(model)

    def per_row(params, batch):
        def one(row):
            sums = eval_step(params, jax.tree.map(lambda x: x[None], row))
            return sums["z_loss_sum"] - sums["loss_sum"]
        return jax.vmap(one)(batch)
    scores = _jit_on_mesh(per_row, partitioner=partitioner, param_shardings=param_shardings)
    return lambda params, batch: [float(s) for s in scores(params, batch)]
