"""What both families' trainer-facing model wrappers share: the loss and its settings.

`t5.EncoderDecoderModel` and `decoder.DecoderOnlyModel` differ in their inputs
(which features, which lengths, which module) but not in how a batch's decoder
targets become a loss, nor in what they tell the trainer about vocabulary and FLOPs:
that part lives here once. `Model` is the whole contract the trainer, evaluation
and decoding rely on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, ContextManager, Protocol

import jax
import numpy as np

from t5x_like.models import losses


class Model(Protocol):
    """What the trainer needs from a model (see models/t5.py, models/decoder.py).

    The model, not the trainer, knows its batch's feature names: a new model family
    implements these members and needs no change here or in training/train_loop.py.
    """

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds and predicts (run_config checks the data's fit)."""

    def init_lengths(self, feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """The length arguments of `init_params` for batches with these features."""

    def init_params(self, rng: jax.Array, *, batch_size: int, **lengths: int) -> Any:
        """Boxed (logically partitioned) parameters for dummy inputs of these shapes."""

    def training_flops_per_step(self, *, feature_lengths: Mapping[str, int],
                                batch_size: int) -> float:
        """Analytic model FLOPs of one training step (models/flop_count.py): MFU."""

    def count_real_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Non-padding tokens in a host batch (the throughput the progress line shows)."""

    def loss_and_metrics(self, params: Any, batch: Mapping[str, jax.Array], *,
                         dropout_rng: jax.Array | None) -> tuple[jax.Array, dict]:
        """(loss summed over the batch's tokens, unnormalised; sums: loss_sum,
        z_loss_sum, accuracy_sum, weight_sum): the trainer divides by weight_sum."""

    @property
    def trainable_pattern(self) -> str | None:
        """Regex over parameter paths of what training updates; None: everything
        (an adapter's parameters only, when the model has one)."""

    @property
    def frozen_dtype(self) -> str:
        """The dtype of the parameters training does not update (an adapter's base)."""

    @property
    def soft_prompt_length(self) -> int:
        """Placeholder tokens the data puts before each example's inputs (0: none)."""

    def started_from_base(self, *, trainable_params: Any, frozen_params: Any,
                          seed: int) -> Any:
        """A new run's trainable parameters once its frozen base is loaded."""


class Adapter(Protocol):
    """A parameter-efficient method that adds its own parameters to a model's and
    trains only those (finetuning/lora.py). The model families need no code for it:
    every `init` and `apply` of the model's module runs inside `applied`."""

    # Regex over parameter paths ('encoder/.../query/lora_a'): what a run trains.
    trainable_pattern: str
    # The dtype the frozen base is held in ('float32', or 'bfloat16' for half the
    # memory; the model computes in its own dtype either way).
    frozen_dtype: str
    # Placeholder tokens the data must put before every example's inputs, which the
    # adapter's soft prompt replaces (finetuning/prompt_tuning.py); 0 for the others.
    soft_prompt_length: int

    def applied(self, *, enable_dropout: bool) -> ContextManager[None]:
        """A context in which the module's layers create and use the adapter."""

    def started_from_base(self, *, trainable_params: Any, frozen_params: Any,
                          seed: int) -> Any:
        """A new run's trainable parameters, given its loaded frozen base (an init
        that reads the base, e.g. a soft prompt from its embeddings; else as is)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableLM:
    """Loss settings and the loss on `decoder_target_tokens`, for a model whose
    `config` counts its FLOPs and whose `logits` the subclass defines."""

    config: Any
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    # 'tokens' | 'total_tokens' | 'sequences'; see losses.normalized_weights.
    loss_normalization: str = 'tokens'
    # A parameter-efficient method (e.g. finetuning.lora.LoRA): its parameters are
    # added to the model's and only they are trained; None trains every parameter.
    adapter: Adapter | None = None

    @property
    def trainable_pattern(self) -> str | None:
        """Regex over parameter paths of what training updates; None: everything."""
        return None if self.adapter is None else self.adapter.trainable_pattern

    @property
    def frozen_dtype(self) -> str:
        """The dtype of the parameters training does not update (an adapter's base)."""
        return 'float32' if self.adapter is None else self.adapter.frozen_dtype

    @property
    def soft_prompt_length(self) -> int:
        """Placeholder tokens the data puts before each example's inputs (0: none)."""
        return 0 if self.adapter is None else self.adapter.soft_prompt_length

    def started_from_base(self, *, trainable_params: Any, frozen_params: Any,
                          seed: int) -> Any:
        """A new adapter run's trainable parameters once its base is loaded."""
        if self.adapter is None:
            return trainable_params
        return self.adapter.started_from_base(
            trainable_params=trainable_params, frozen_params=frozen_params, seed=seed)

    def adapted(self, *, enable_dropout: bool = False) -> ContextManager[None]:
        """Where the module's `init` and `apply` run: with the adapter, if any."""
        if self.adapter is None:
            return contextlib.nullcontext()
        return self.adapter.applied(enable_dropout=enable_dropout)

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds and predicts; the data's must be below it."""
        return self.config.vocab_size

    def training_flops_per_step(self, *, feature_lengths: Mapping[str, int],
                                batch_size: int) -> float:
        """Model FLOPs of one training step on `batch_size` rows (the MFU numerator):
        an adapter run's frozen base gets no weight gradients (see flop_count)."""
        return batch_size * self.config.training_flops_per_sequence(
            **self.init_lengths(feature_lengths), frozen_weights=self.adapter is not None)

    def loss_and_metrics(
        self, params, batch: Mapping[str, jax.Array], *, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The summed loss over weighted target tokens (the trainer divides it by
        weight_sum once, after summing microbatches), plus exact sums for aggregation.

        metrics: loss_sum (cross-entropy + z-loss, weighted), z_loss_sum,
        accuracy_sum (weighted count of argmax == target), weight_sum.
        Dropout is on iff `dropout_rng` is given.
        """
        logits_BxLxV = self.logits(params, batch, dropout_rng=dropout_rng)
        return losses.loss_and_metric_sums(
            logits_BxLxV,
            batch['decoder_target_tokens'],
            batch['decoder_loss_weights'],
            segment_ids_BxL=batch.get('decoder_segment_ids'),
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
            normalization=self.loss_normalization,
        )
