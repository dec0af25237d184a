"""Where a run starts: its latest checkpoint (state, data positions, log interval)
or a new state, with the data stream positioned at that step.

A resumed run sees exactly the batches an uninterrupted run would have seen: each
data shard continues from the position saved with the step, or replays to it when
the checkpoint has none or the data settings changed (with a warning saying so).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from t5x_like.checkpointing import base_model, checkpoints
from t5x_like.checkpointing.init_from import InitFrom, restore_params_from
from t5x_like.reporting import param_table
from t5x_like.training import trainer
from t5x_like.training.run_config import RunConfig

log = logging.getLogger(__name__)

# Where a checkpoint keeps the sums of a log interval that it cuts in two.
INTERVAL_SUMS = "log_interval_sums"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Start:
    """The state a run starts from, and what its checkpoint said about the data.

    An adapter run also starts from its frozen base (`frozen`, read from init_from
    every time) and that base's identity, saved with each of its checkpoints."""
    state: Any
    step: int
    saved_data: Mapping[str, Any] | None     # None: a new run
    frozen: Any = None
    base: base_model.BaseIdentity | None = None

    @property
    def frozen_args(self) -> tuple[Any, ...]:
        """The train step's arguments after (state, batch): the frozen base, if any."""
        return () if self.base is None else (self.frozen,)


def restore_or_init(*, run: RunConfig, checkpointer: checkpoints.Checkpointer,
                    partitioner: Any, layout: trainer.StateLayout,
                    feature_lengths: Mapping[str, int], init_from: InitFrom | None) -> Start:
    """The latest good checkpoint's state; else a new one, from `init_from`'s
    parameters when given (the optimizer starts fresh). An adapter run reads its
    frozen base from `init_from` first, and resumes only onto the same base."""
    frozen = base = None
    if layout.frozen is not None:
        frozen, base = base_model.load(
            init_from, abstract_frozen=layout.frozen.abstract_with_shardings())
        log.info("Frozen base: %s; training %d of the model's %d parameters (%s)",
                 base.describe(), param_table.count_parameters(layout.abstract.params),
                 param_table.count_parameters(layout.model_params.abstract),
                 run.model.trainable_pattern)
    restored = checkpointer.restore_latest(abstract_state=layout.abstract_with_shardings())
    if restored is not None:
        step, state, saved_data = restored
        if base is not None:
            base_model.check_same(checkpointer.read_base_model(step), base,
                                  checkpoint=f"checkpoint step {step} in "
                                  f"{checkpointer.directory}")
        log.info("Resumed from checkpoint at step %d in %s", step, checkpointer.directory)
        return Start(state=state, step=int(state.step), saved_data=saved_data,
                     frozen=frozen, base=base)
    state = trainer.init_train_state(model=run.model, optimizer=run.optimizer,
                                     partitioner=partitioner, feature_lengths=feature_lengths,
                                     seed=run.seed, layout=layout)
    log.info("Initialised a new model (seed %d)", run.seed)
    if base is not None:
        state = state.replace(params=run.model.started_from_base(
            trainable_params=state.params, frozen_params=frozen, seed=run.seed))
    if init_from is not None and base is None:
        state = state.replace(params=restore_params_from(
            init_from, abstract_params=layout.abstract_with_shardings().params,
            fresh_params=state.params))
    return Start(state=state, step=int(state.step), saved_data=None, frozen=frozen,
                 base=base)


def _check_data_position(data_position: Mapping[str, Any], *, batch_size: int,
                         data_stream: Mapping[str, Any], num_data_shards: int) -> bool:
    """Whether the checkpoint's data settings are this run's (warns if not).

    `data_stream` is the data source's `stream_identity()` (its seed, task, lengths,
    ...), which is what seeds and shapes the stream; the run's init seed is not part
    of it. A checkpoint from before it was recorded is compared on the rest.
    """
    now = {"global_batch_size": batch_size, "num_data_shards": num_data_shards,
           "data_stream": dict(data_stream)}
    if "data_stream" not in data_position:
        now.pop("data_stream")
    saved = {k: data_position.get(k) for k in now}
    if saved != now:
        changed = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if "data_stream" in changed:
            before, after = changed.pop("data_stream")
            changed.update({f"data_stream.{k}": (before.get(k), after.get(k))
                            for k in set(before) | set(after) if before.get(k) != after.get(k)})
        log.warning("Checkpoint's data settings differ from this run's (%s): the data "
                    "stream after resuming differs from the original run's.",
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
    return saved == now


def saved_shard_positions(checkpointer: checkpoints.Checkpointer,
                           data_position: Mapping[str, Any], *, step: int,
                           shards: range, batch_size: int, data_stream: Mapping[str, Any],
                           num_data_shards: int) -> dict[int, bytes] | None:
    """The saved positions of this process's shards, when they apply to this run.

    Without them (a checkpoint from before positions were saved, or changed data
    settings) each shard replays `step` batches: exact, but its cost grows with the
    step.
    """
    if not _check_data_position(data_position, batch_size=batch_size,
                                data_stream=data_stream, num_data_shards=num_data_shards):
        return None
    positions = checkpointer.read_shard_positions(step, shards=shards,
                                                  num_data_shards=num_data_shards)
    if positions is None:
        log.warning("Checkpoint step %d has no saved input positions for data shards %s "
                    "(written by an older version?): replaying %d batches to reach the "
                    "step.", step, list(shards), step)
    else:
        log.info("Data shards %s continue from their saved positions (%s bytes).",
                 list(shards), "+".join(str(len(p)) for p in positions.values()))
    return positions
