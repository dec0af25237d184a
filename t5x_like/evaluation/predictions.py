"""What seqio metrics score: a model's decoded predictions and its log-likelihoods.

A task's `metric_fns` (text_metrics.py) are scored on the model's output decoded to
text. The model's side is a prediction function

    predict_fn(params, batch) -> list[list[int]]

over a batch of seqio model features (the unpacked feature converter's, the same
whole global batch on every process), returning one list of token ids per row with
EOS and everything after it removed. A `Predictor` builds one for a model and mesh
(`bind`); `checkpoint_eval.evaluate_checkpoints.predictor` chooses it in gin, and its
`name` prefixes the scores it produced ('greedy/exact_match', 'beam4/rouge_l'), so a
number always says how it was made.

  Decoded   the model's own generation, `decode.predict_batch` on the batch's
            inputs (the encoder input, or a prefix LM's prompt); greedy and at most
            the task's target length unless `config` says otherwise.

`log_likelihood_fn` gives each example's log p(targets | inputs) (the sum over its
target tokens) for `score_metric_fns`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from t5x_like.decoding import decode
from t5x_like.evaluation import teacher_forced
from t5x_like.parallel import partitioning
from t5x_like.models.trainable import Model

PredictFn = Callable[[Any, Mapping[str, np.ndarray]], list[list[int]]]
ScoreFn = Callable[[Any, Mapping[str, np.ndarray]], list[float]]


class Predictor(Protocol):
    name: str
    settings: dict[str, Any]

    def bind(self, *, model: Model, partitioner: partitioning.Partitioner,
             param_shardings: Any, max_decode_length: int) -> PredictFn: ...


def _jit_on_mesh(fn: Callable, *, partitioner: partitioning.Partitioner,
                 param_shardings: Any) -> Callable:
    """`fn(params, batch)` jitted with the params' shardings; replicated output, so
    every process can read all of it."""
    jitted = partitioner.jit(fn, out_shardings=partitioner.replicated())

    def call(params, batch):
        params = jax.device_put(params, param_shardings)
        return np.asarray(jax.device_get(
            jitted(params, partitioning.global_batch(batch, partitioner, rows="all"))))
    return call


def model_eos_id(model: Model) -> int:
    """The id that ends the model's sequences: its config's `eos_token_id` (a decoder's
    vocabulary's, or an imported Hugging Face model's: Llama 2's is 2; of several, as
    Llama 3's, the first, as launch.infer takes it), else 1: a T5 config has none, and
    T5's vocabularies, seqio's and ours (data/vocabularies.py), put EOS at 1."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", 1)
    if eos is None:
        raise ValueError(f"{type(model).__name__}'s config has eos_token_id=None, so its "
                         "predictions would never end; set the config's eos_token_id.")
    return int(eos[0] if isinstance(eos, (tuple, list)) else eos)


def strip_after_eos(tokens: np.ndarray, *, eos_id: int) -> list[int]:
    ids = [int(t) for t in tokens]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoded:
    """Predictions the model generates (see the module docstring).

    Attributes:
      config: how to decode (gin: `predictions.Decoded.config =
        @decode.DecodeConfig()`); None = greedy, at most the task's target length
        (`max_decode_length` given to `bind`), as T5X evaluates. Its eos_id is
        replaced by the model's (`model_eos_id`), as launch.infer does: decoding
        stops, and predictions are cut, where the model ends its sequences.
      seed: sampling's random key (with temperature > 0); each batch folds in a hash
        of its inputs, so the same examples get the same samples on every run.
    """
    config: decode.DecodeConfig | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        config = self.config or decode.DecodeConfig()
        if config.num_beams > 1:
            return f"beam{config.num_beams}"
        return "greedy" if config.is_greedy else "sample"

    @property
    def settings(self) -> dict[str, Any]:
        """What the predictions depend on (an evaluation record's settings)."""
        return {"name": self.name, "seed": self.seed,
                "config": None if self.config is None else dataclasses.asdict(self.config)}

    def bind(self, *, model: Model, partitioner: partitioning.Partitioner,
             param_shardings: Any, max_decode_length: int) -> PredictFn:
        config = dataclasses.replace(
            self.config or decode.DecodeConfig(max_decode_length=max_decode_length),
            eos_id=model_eos_id(model))
        replicated = partitioner.jit(lambda x: x, out_shardings=partitioner.replicated())

        def predict(params, batch):
            rng = jax.random.key(self.seed)
            if not config.is_greedy:
                inputs = batch.get("encoder_input_tokens", batch.get("decoder_input_tokens"))
                rng = jax.random.fold_in(rng, zlib.crc32(np.asarray(inputs).tobytes()) >> 1)
            result = decode.predict_batch(
                model, jax.device_put(params, param_shardings),
                partitioning.global_batch(batch, partitioner, rows="all"), config=config,
                rng=rng, partitioner=partitioner)
            tokens_BxL = np.asarray(jax.device_get(replicated(result.tokens_BxL)))
            return [strip_after_eos(row, eos_id=config.eos_id) for row in tokens_BxL]
        return predict


def log_likelihood_fn(*, model: Model, partitioner: partitioning.Partitioner,
                      param_shardings: Any) -> ScoreFn:
    """`(params, batch) -> [log p(targets) per row]`: minus the summed cross-entropy
    of each row's target tokens (no z-loss, no label smoothing)."""
    eval_step = teacher_forced.make_eval_step(model)

    def per_row(params, batch):
        def one(row):
            sums = eval_step(params, jax.tree.map(lambda x: x[None], row))
            return sums["z_loss_sum"] - sums["loss_sum"]
        return jax.vmap(one)(batch)
    scores = _jit_on_mesh(per_row, partitioner=partitioner, param_shardings=param_shardings)
    return lambda params, batch: [float(s) for s in scores(params, batch)]
