"""What one training run is, as one value: model, optimizer, data, mesh and batch.

`train()` trains a `RunConfig`; `launch.compile` (the AOT fit check, `training/aot.py`)
compiles one. Both launchers get it from gin the same way, `from_gin()`, and both
build the state layout and the jitted step through the two methods below, so the
fit check compiles exactly the step that training runs.

The partitioner is held as a factory (in gin: `@partitioning.Partitioner`, no
parentheses), i.e. mesh-shape settings rather than a built mesh: training calls it
over the local devices, the fit check over the devices of a TPU slice it does not
own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import gin

from t5x_like import errors
from t5x_like.config import argument_types
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.training.optimizers import Optimizer
from t5x_like.data.contract import DataSource
from t5x_like.models.trainable import Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The run's parts. Everything about how the loop is driven (steps,
    checkpointing, logging) stays with `train()`."""

    model: Model
    optimizer: Optimizer
    # None only for a run that is compiled, never trained: `launch.compile` with
    # explicit --feature_lengths builds no data source.
    train_data: DataSource | None
    partitioner: Callable[..., partitioning.Partitioner]
    batch_size: int                 # global: sequences per step over all hosts
    num_microbatches: int = 1       # gradient accumulation; the update is the full-batch one
    seed: int = 0                   # parameter init and dropout

    def __post_init__(self):
        argument_types.check(RunConfig, {f.name: getattr(self, f.name)
                                         for f in dataclasses.fields(self)})
        if self.batch_size < 1 or self.num_microbatches < 1:
            raise errors.ConfigError(
                f"batch_size ({self.batch_size}) and num_microbatches "
                f"({self.num_microbatches}) must be positive",
                fix="set run_config.RunConfig.batch_size (BATCH_SIZE) and num_microbatches")
        if self.batch_size % self.num_microbatches:
            raise errors.ConfigError(
                f"batch_size={self.batch_size} is not divisible by "
                f"num_microbatches={self.num_microbatches}",
                fix="choose a num_microbatches that divides the batch")
        if self.train_data is not None:
            check_vocabulary(self.model, self.train_data)
            check_soft_prompt(self.model, self.train_data)

    def feature_lengths(self) -> dict[str, int]:
        """The batch's features and their lengths, as the data source yields them."""
        if self.train_data is None:
            raise errors.ConfigError("This run has no train_data",
                                     fix="bind run_config.RunConfig.train_data")
        return dict(self.train_data.model_feature_lengths())

    def state_layout(self, partitioner: partitioning.Partitioner,
                     feature_lengths: Mapping[str, int]) -> trainer.StateLayout:
        if self.batch_size % partitioner.data_shards:
            raise errors.ConfigError(
                f"batch_size={self.batch_size} does not divide evenly over the "
                f"{partitioner.data_shards} data shards of {partitioner}",
                fix="use a multiple of the data shards, or another mesh shape")
        return trainer.state_layout(model=self.model, optimizer=self.optimizer,
                                    partitioner=partitioner, feature_lengths=feature_lengths)

    def jitted_train_step(self, partitioner: partitioning.Partitioner,
                          layout: trainer.StateLayout,
                          feature_lengths: Mapping[str, int]) -> partitioning.MeshJitted:
        """The step `train()` runs (call it) and the fit check compiles (`lower` it)."""
        return trainer.jit_train_step(
            trainer.make_train_step(model=self.model, optimizer=self.optimizer,
                                    num_microbatches=self.num_microbatches,
                                    dropout_seed=self.seed),
            partitioner=partitioner, layout=layout,
            batch_feature_names=tuple(feature_lengths))


def check_vocabulary(model: Model, train_data: DataSource) -> None:
    """The model's vocabulary must cover the data's ids, sentinels included, as T5X
    checks model against task vocabulary. Otherwise an id past the embedding table
    reads NaN (JAX fills out-of-range gathers) and the run halts on a NaN loss with
    advice about the learning rate. Checked here, before any model init."""
    needed = train_data.vocabulary_size()
    if model.vocab_size < needed:
        config = getattr(model, "config", None)
        setting = f"{type(config).__name__}.vocab_size" if config is not None else "vocab_size"
        raise errors.ConfigError(
            f"the model's vocab_size {model.vocab_size} does not cover the data's vocabulary "
            f"of {needed} ids (sentinel/extra ids included)",
            fix=f"set {setting} >= {needed} (T5 rounds it up to a multiple of 128, e.g. "
            "32100 -> 32128)")


def check_soft_prompt(model: Model, train_data: DataSource) -> None:
    """A prompt-tuned model's prompt length must be the placeholders the data puts
    before each example's inputs: with fewer, the prompt overwrites the example's
    own first tokens; with more, placeholders reach the model as tokens. Checked here,
    before any model init."""
    wanted = model.soft_prompt_length
    reserved = getattr(train_data, "soft_prompt_length", 0)
    if wanted != reserved:
        raise errors.ConfigError(
            f"the model's soft prompt has {wanted} vectors but the data puts {reserved} "
            "placeholder tokens before each example's inputs",
            fix="set both from one macro, as configs/runs/finetune_prompt.gin does "
            "(prompt_tuning.PromptTuning.length and "
            "pipeline.SeqioDataSource.soft_prompt_length = %PROMPT_LENGTH)")


def from_gin(**overrides: Any) -> RunConfig:
    """The RunConfig of the parsed gin config; `overrides` replace bound fields.

    Raises ConfigError naming what is missing when the config does not describe a run.
    """
    try:
        configured = gin.get_configurable(RunConfig)
    except ValueError as e:
        raise errors.ConfigError(
            "The gin config does not configure run_config.RunConfig",
            fix="include configs/runs/pretrain.gin (configs/base.gin does)") from e
    try:
        return configured(**overrides)
    except TypeError as e:
        if isinstance(e, errors.RunError):
            raise
        raise errors.ConfigError(
            f"The gin config does not describe a whole run ({e})",
            fix="a model comes from configs/models/*.gin, the rest from "
            "configs/runs/pretrain.gin") from e
