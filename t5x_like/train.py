"""`train()`: the whole training run, readable top to bottom.

Every argument is injected (from gin, by `launch/train.py`, or directly from Python
in tests), so this function holds only the order of events:

  mesh -> state layout -> restore or init -> data positioned at the step ->
  [batch -> global arrays -> jitted step -> metrics -> async checkpoint]* -> final save
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import gin
import jax
import numpy as np

from t5x_like import checkpoints, metrics as metrics_lib, param_table, partitioning, trainer
from t5x_like.optimizers import Optimizer

log = logging.getLogger(__name__)


class DataSource(Protocol):
    """What train() needs from the input pipeline (see input_pipeline.py)."""

    def model_feature_lengths(self) -> Mapping[str, int]: ...

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int) -> Iterator[dict[str, np.ndarray]]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    start_step: int               # where this invocation began (0, or the resumed step)
    final_step: int
    losses: dict[int, float]      # step -> loss at every logged step of this invocation
    final_state: Any


def train(*, model_dir: str, model: trainer.Model, train_data: DataSource,
          partitioner: partitioning.Partitioner, optimizer: Optimizer, train_steps: int,
          batch_size: int, seed: int = 0, num_microbatches: int = 1,
          checkpoint_every_steps: int = 100, keep_checkpoints: int | None = 3,
          async_checkpointing: bool = True, log_every_steps: int = 10) -> TrainResult:
    """Trains `model` on `train_data` until `train_steps`, resuming if possible.

    Args:
      model_dir: where checkpoints, TensorBoard events and the gin config go.
        Rerunning with the same directory resumes from its latest checkpoint.
      batch_size: the global batch size (sequences per step over all hosts).
      num_microbatches: gradient accumulation; the update equals the full-batch one.
    """
    is_lead_host = jax.process_index() == 0
    os.makedirs(model_dir, exist_ok=True)
    if batch_size % jax.process_count():
        raise ValueError(f"batch_size={batch_size} must divide evenly over "
                         f"{jax.process_count()} processes.")
    if batch_size % partitioner.data_shards:
        raise ValueError(f"batch_size={batch_size} must divide evenly over the "
                         f"{partitioner.data_shards} data shards of {partitioner}.")
    if is_lead_host:
        with open(os.path.join(model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    # ----------------------------------------------------------- state layout
    feature_lengths = dict(train_data.model_feature_lengths())
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=feature_lengths)
    log.info("Devices: %d (%s), processes: %d, %s", jax.device_count(),
             jax.devices()[0].platform, jax.process_count(), partitioner)
    log.info("Parameters:\n%s", param_table.parameter_table(
        layout.abstract.params, layout.logical_specs.params, layout.shardings.params))

    # ----------------------------------------------------------- restore or init
    checkpointer = checkpoints.Checkpointer(
        directory=os.path.join(os.path.abspath(model_dir), "checkpoints"),
        max_to_keep=keep_checkpoints,
        async_save=async_checkpointing)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_position = checkpointer.restore(
            latest, abstract_state=layout.abstract_with_shardings())
        _check_data_position(data_position, batch_size=batch_size, seed=seed)
        log.info("Resumed from checkpoint at step %d in %s", latest, checkpointer.directory)
    else:
        state = trainer.init_train_state(model=model, optimizer=optimizer,
                                         partitioner=partitioner,
                                         feature_lengths=feature_lengths, seed=seed,
                                         layout=layout)
        log.info("Initialised a new model (seed %d)", seed)
    start_step = int(state.step)

    # ----------------------------------------------------------- data, positioned at the step
    batches = train_data.iterator(per_host_batch_size=batch_size // jax.process_count(),
                                  shard_index=jax.process_index(),
                                  num_shards=jax.process_count(), start_step=start_step)

    # ----------------------------------------------------------- the loop
    train_step = trainer.jit_train_step(
        trainer.make_train_step(model=model, optimizer=optimizer,
                                num_microbatches=num_microbatches, dropout_seed=seed),
        partitioner=partitioner, layout=layout, batch_feature_names=tuple(feature_lengths))
    writer = metrics_lib.TensorBoardWriter(logdir=os.path.join(model_dir, "train")) \
        if is_lead_host else None
    progress = metrics_lib.Progress(total_steps=train_steps, start_step=start_step)
    data_position = {"step": start_step, "global_batch_size": batch_size, "seed": seed}
    losses: dict[int, float] = {}
    step = start_step
    try:
        while step < train_steps:
            local_batch = next(batches)
            progress.add_tokens(_count_real_tokens(local_batch) * jax.process_count())
            state, step_metrics = train_step(
                state, partitioning.host_local_to_global(local_batch, partitioner))
            step += 1
            data_position = {**data_position, "step": step}
            is_last = step == train_steps
            due_to_save = is_last or step % checkpoint_every_steps == 0
            if is_last or step % log_every_steps == 0 or due_to_save:
                host_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                _halt_if_not_finite(host_metrics, step, checkpointer)
                losses[step] = host_metrics["loss"]
                if step % log_every_steps == 0 or is_last:
                    rates = progress.tick(step)
                    log.info(progress.line(step, host_metrics, rates))
                    if writer:
                        writer.write_scalars(step, {**host_metrics, **rates})
            if due_to_save:
                checkpointer.save(step, state, data_position=data_position)
    finally:
        checkpointer.close()          # waits for any in-flight async save
        if writer:
            writer.close()
    log.info("Finished at step %d; checkpoints in %s", step, checkpointer.directory)
    return TrainResult(start_step=start_step, final_step=step, losses=losses,
                       final_state=state)


def _count_real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Non-padding tokens in this host's batch (inputs and targets)."""
    return int(sum(np.count_nonzero(v) for k, v in batch.items()
                   if k.endswith("input_tokens") or k == "decoder_target_tokens"))


def _halt_if_not_finite(host_metrics: Mapping[str, float], step: int,
                        checkpointer: checkpoints.Checkpointer) -> None:
    if not math.isfinite(host_metrics["loss"]):
        checkpointer.wait_until_finished()
        last = checkpointer.latest_step()
        where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
                 if last is not None else "no checkpoint was written yet")
        raise FloatingPointError(
            f"Loss became {host_metrics['loss']} at step {step}; {where}. Lower the "
            "learning rate or check the data, then rerun to resume from that checkpoint.")


def _check_data_position(data_position: Mapping[str, Any], *, batch_size: int,
                         seed: int) -> None:
    saved = (data_position.get("global_batch_size"), data_position.get("seed"))
    if saved != (batch_size, seed):
        log.warning(
            "Checkpoint was written with global_batch_size=%s, seed=%s but this run uses "
            "%s, %s: the data stream after resuming differs from the original run's.",
            saved[0], saved[1], batch_size, seed)
