"""`train()`: the whole training run, readable top to bottom.

What is trained comes in as one `RunConfig` (model, optimizer, data, mesh, batch;
see training/run_config.py); how the loop is driven (steps, checkpoints, logging) are the
other arguments. Everything is injected (from gin by `launch/train.py`, or directly
from Python in tests), so this function holds only the order of events:

  checks (settings, MODEL_DIR, data) -> mesh -> state layout -> restore or init ->
  data positioned at the step ->
  [batch -> global arrays -> jitted step -> metrics -> async checkpoint]* -> final save

Whatever a person can fix is raised as an `errors.RunError` (the launcher prints it
as one line), and is checked before the expensive part where it can be.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import gin
import jax

from t5x_like import errors, run_dir, storage
from t5x_like.config import argument_types
from t5x_like.checkpointing import checkpoints
from t5x_like.checkpointing.init_from import InitFrom, restore_params_from
from t5x_like.reporting import device_peaks
from t5x_like.evaluation import teacher_forced
from t5x_like.reporting import metrics as metrics_lib
from t5x_like.reporting import param_table
from t5x_like.parallel import partitioning
from t5x_like.training import preemption
from t5x_like.training import trainer
from t5x_like.data import host_batches
from t5x_like.training.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    start_step: int               # where this invocation began (0, or the resumed step)
    final_step: int
    losses: dict[int, float]      # step -> loss at every logged step of this invocation
    final_state: Any
    preempted: bool = False


class NonFiniteError(errors.RunError, FloatingPointError):
    """Training stopped on a NaN/Inf loss, gradient or update."""


def train(*, run: RunConfig, model_dir: str, train_steps: int,
          num_data_shards: int | None = None,
          checkpoint_every_steps: int = 100, keep_checkpoints: int | None = 3,
          keep_checkpoint_period: int | None = None, async_checkpointing: bool = True,
          init_from: InitFrom | None = None,
          on_nonfinite_loss: Literal["halt", "skip_update"] = "halt",
          max_consecutive_skipped_steps: int = 10,
          log_every_steps: int = 10, eval_every_steps: int = 0, eval_batches: int = 10,
          peak_flops_per_device: float | None = None) -> TrainResult:
    """Trains `run.model` on `run.train_data` until `train_steps`, resuming if possible.

    Args:
      run: what is trained (see RunConfig); launch.compile compiles the same.
      model_dir: where checkpoints, TensorBoard events and the gin config go (a
        local folder or a URL such as gs://bucket/run; run_dir.py lists what goes
        where). Rerunning with the same directory resumes from its latest checkpoint.
      num_data_shards: how many shards the input is split into (default: one per
        process). Runs with the same value see the same batches on any number of
        processes that divides it.
      keep_checkpoints / keep_checkpoint_period: keep the latest N checkpoints, plus
        every step that is a multiple of the period, forever.
      init_from: for a new run, take parameters from another run's checkpoint.
      on_nonfinite_loss: a step with a NaN/Inf loss, gradient or update is never
        applied; 'halt' then stops with an error naming the step, 'skip_update' goes
        on, but stops after `max_consecutive_skipped_steps` skipped steps in a row
        (the checkpoint saved before the first of them is kept).
      log_every_steps: the progress line and TensorBoard show, every this many steps
        (and at the last), the metrics averaged over the steps since the previous
        multiple (metrics.IntervalMeans: loss and accuracy weighted by target tokens).
      eval_every_steps / eval_batches: every N steps (and at the last), loss,
        accuracy and perplexity on the first `eval_batches` batches of each task's
        validation split (see evaluation/teacher_forced.py); 0 turns eval off.
      peak_flops_per_device: the FLOP/s that MFU is measured against; default: the
        device's dense bf16 peak from reporting/device_peaks.py (none on CPU: no MFU shown).
    """
    # ----------------------------------------------------------- checks, before any work
    argument_types.check(train, dict(locals()))   # locals() holds exactly the arguments
    if min(checkpoint_every_steps, log_every_steps, max_consecutive_skipped_steps) < 1:
        raise errors.ConfigError(
            f"checkpoint_every_steps={checkpoint_every_steps}, log_every_steps="
            f"{log_every_steps} and max_consecutive_skipped_steps="
            f"{max_consecutive_skipped_steps} must be >= 1",
            fix="correct the train_loop.train binding")
    # The run's parts, by the names the sections below use.
    model, train_data, batch_size, seed = run.model, run.train_data, run.batch_size, run.seed
    model_dir = storage.resolve(model_dir)          # a URL stays one; a local path absolute
    is_lead_host = jax.process_index() == 0
    # Processes feed the batch rows their devices hold: one block each, or one
    # shared by several when the model axis spans processes.
    partitioner = run.partitioner()
    block = partitioning.batch_block(partitioner)
    num_data_shards = num_data_shards or block.count
    if is_lead_host:
        _write_operative_config(model_dir)
    checkpointer = checkpoints.Checkpointer(
        directory=run_dir.checkpoints(model_dir), max_to_keep=keep_checkpoints,
        keep_period=keep_checkpoint_period, async_save=async_checkpointing)
    checkpointer.check_writable()
    feature_lengths = run.feature_lengths()
    shards = host_batches.owned_shards(num_data_shards=num_data_shards,
                                       process_index=block.index, process_count=block.count)
    for shard in shards:            # an empty corpus fails now, not after model init
        train_data.check(shard_index=shard, num_shards=num_data_shards)

    # ----------------------------------------------------------- mesh and state layout
    layout = run.state_layout(partitioner, feature_lengths)
    log.info("Devices: %d (%s), processes: %d, %s", jax.device_count(),
             jax.devices()[0].platform, jax.process_count(), partitioner)
    table_path = run_dir.parameter_table(model_dir)
    log.info("Parameters (each one, with its sharding, in %s):\n%s", table_path,
             param_table.module_summary(layout.abstract.params))
    if is_lead_host:
        storage.write_text(table_path, param_table.parameter_table(
            layout.abstract.params, layout.logical_specs.params,
            layout.shardings.params) + "\n")

    # ----------------------------------------------------------- eval data (before any FLOP)
    evaluator = teacher_forced.evaluator_for_run(
        run=run, partitioner=partitioner, param_shardings=layout.shardings.params,
        num_batches=eval_batches, logdir=run_dir.eval_dir(model_dir)
    ) if eval_every_steps else None

    # ----------------------------------------------------------- restore or init
    restored = checkpointer.restore_latest(abstract_state=layout.abstract_with_shardings())
    saved_data = None
    if restored is not None:
        restored_step, state, saved_data = restored
        log.info("Resumed from checkpoint at step %d in %s", restored_step,
                 checkpointer.directory)
    else:
        state = trainer.init_train_state(model=model, optimizer=run.optimizer,
                                         partitioner=partitioner,
                                         feature_lengths=feature_lengths, seed=seed,
                                         layout=layout)
        log.info("Initialised a new model (seed %d)", seed)
        if init_from is not None:
            state = state.replace(params=restore_params_from(
                init_from, abstract_params=layout.abstract_with_shardings().params,
                fresh_params=state.params))
    start_step = int(state.step)

    # ----------------------------------------------------------- data, positioned at the step
    data_stream = dict(train_data.stream_identity())
    positions = None if saved_data is None else _saved_shard_positions(
        checkpointer, saved_data, step=start_step, shards=shards, batch_size=batch_size,
        data_stream=data_stream, num_data_shards=num_data_shards)
    batches = host_batches.HostBatches(
        train_data, global_batch_size=batch_size, num_data_shards=num_data_shards,
        process_index=block.index, process_count=block.count,
        start_step=start_step, positions=positions)

    # ----------------------------------------------------------- the loop
    train_step = run.jitted_train_step(partitioner, layout, feature_lengths)
    writer = metrics_lib.TensorBoardWriter(logdir=run_dir.train_events(model_dir)) \
        if is_lead_host else None
    progress = metrics_lib.Progress(
        total_steps=train_steps, start_step=start_step, num_devices=jax.device_count(),
        flops_per_step=model.training_flops_per_step(feature_lengths=feature_lengths,
                                                     batch_size=batch_size),
        peak_flops_per_device=(peak_flops_per_device or
                               device_peaks.peak_bf16_flops(jax.devices()[0].device_kind)))
    guard = _NonFiniteGuard(policy=on_nonfinite_loss, checkpointer=checkpointer,
                            max_consecutive=max_consecutive_skipped_steps)
    # Logged values average the steps since the last multiple of log_every_steps; an
    # unfinished interval's sums go into each checkpoint, so resuming never splits one.
    interval = metrics_lib.IntervalMeans(
        sums=None if saved_data is None else saved_data.get(_INTERVAL_SUMS))
    watcher = preemption.PreemptionWatcher()
    data_position = {"step": start_step, "global_batch_size": batch_size,
                     "data_stream": data_stream, "num_data_shards": num_data_shards}
    losses: dict[int, float] = {}
    step, preempted = start_step, watcher.should_stop(start_step)
    if preempted:                  # SIGTERM during start-up: no step taken, nothing to save
        log.warning("Preempted (SIGTERM) during start-up, before step %d: nothing new to "
                    "save; exiting cleanly. Rerun the same command to resume.", step + 1)
    try:
        while step < train_steps and not preempted:
            local_batch = next(batches)
            progress.add_tokens(model.count_real_tokens(local_batch) * block.count)
            state, step_metrics = train_step(
                state, partitioning.global_batch(local_batch, partitioner))
            interval.add(step_metrics)              # on device: the host does not wait
            step += 1
            guard.observe(step, step_metrics)      # checks the previous step: no stall
            checkpointer.raise_if_save_failed()    # a failed background write, now
            data_position = {**data_position, "step": step}
            preempted = watcher.should_stop(step)
            is_last = step == train_steps
            if is_last or step % log_every_steps == 0:
                host_metrics = interval.means()
                if step % log_every_steps == 0:     # a last-step log leaves it open
                    interval.reset()
                losses[step] = host_metrics["loss"]
                rates = progress.tick(step)
                log.info(progress.line(step, host_metrics, rates))
                if writer:
                    writer.write_scalars(step, {**host_metrics, **rates})
            if is_last or preempted or step % checkpoint_every_steps == 0:
                guard.flush()                      # never save past an unchecked step
                checkpointer.save(step, state,
                                  data_position={**data_position,
                                                 _INTERVAL_SUMS: interval.sums()},
                                  shard_positions=batches.positions() if block.leads else {},
                                  num_data_shards=num_data_shards)
            if evaluator and not preempted and (is_last or step % eval_every_steps == 0):
                evaluator.evaluate(step, state.params)
            if preempted:
                log.warning("Preempted (SIGTERM): saved step %d; exiting cleanly. Rerun "
                            "the same command to resume.", step)
                break
        guard.flush()
    finally:
        guard.log_summary()
        watcher.close()
        checkpointer.close()          # waits for any in-flight async save
        if writer:
            writer.close()
        if evaluator:
            evaluator.close()
    log.info("Stopped at step %d; checkpoints in %s", step, checkpointer.directory)
    return TrainResult(start_step=start_step, final_step=step, losses=losses,
                       final_state=state, preempted=preempted)


# Where a checkpoint keeps the sums of a log interval that it cuts in two.
_INTERVAL_SUMS = "log_interval_sums"


class _NonFiniteGuard:
    """Reads each step's `nonfinite` flag one step late, so the device never waits.

    The step itself already refused to apply a non-finite update, so the state in
    memory (and any checkpoint) is the last good one. Under 'skip_update', the
    checkpoint saved before the first of a run of skipped steps is protected from
    rotation, and `max_consecutive` skipped steps in a row stop the run.
    """

    def __init__(self, *, policy: str, checkpointer: checkpoints.Checkpointer,
                 max_consecutive: int):
        self._policy = policy
        self._checkpointer = checkpointer
        self._max_consecutive = max_consecutive
        self._pending: tuple[int, Mapping[str, jax.Array]] | None = None
        self._in_a_row: list[int] = []
        self._kept_step: int | None = None     # saved before the first of them
        self.skipped: list[tuple[int, str]] = []    # (step, what was non-finite)

    def observe(self, step: int, step_metrics: Mapping[str, jax.Array]) -> None:
        self.flush()
        self._pending = (step, step_metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, step_metrics = self._pending
        self._pending = None
        if float(step_metrics["nonfinite"]) == 0.0:
            self._in_a_row = []
            return
        what = _nonfinite_quantity(step_metrics)
        self.skipped.append((step, what))
        if self._policy == "halt":
            raise self._halted(step, what)
        if not self._in_a_row:
            self._kept_step = self._checkpointer.latest_step()
            if self._kept_step is not None:
                self._checkpointer.protect(self._kept_step)
        self._in_a_row.append(step)
        log.warning("Step %d: the %s is NaN/Inf; the update was skipped (%d in a row, %d "
                    "so far).", step, what, len(self._in_a_row), len(self.skipped))
        if len(self._in_a_row) >= self._max_consecutive:
            raise self._too_many_in_a_row()

    def _halted(self, step: int, what: str) -> NonFiniteError:
        self._checkpointer.wait_until_finished()
        last = self._checkpointer.latest_step()
        if last is None:
            return NonFiniteError(
                f"The {what} became NaN/Inf at step {step} (the update was not applied); "
                "no checkpoint was written before it",
                fix="lower the learning rate or check the data, then start again (or set "
                "train_loop.train.on_nonfinite_loss='skip_update')")
        return NonFiniteError(
            f"The {what} became NaN/Inf at step {step} (the update was not applied); the "
            f"last good checkpoint is step {last} in {self._checkpointer.directory}",
            fix="lower the learning rate or check the data, then rerun to resume from that "
            "checkpoint (or set train_loop.train.on_nonfinite_loss='skip_update')")

    def _too_many_in_a_row(self) -> NonFiniteError:
        first, last = self._in_a_row[0], self._in_a_row[-1]
        whats = sorted({what for step, what in self.skipped if step >= first})
        kept = (f"step {self._kept_step}, saved before the first of them, is kept in "
                f"{self._checkpointer.directory} (later checkpoints hold the same "
                "parameters)" if self._kept_step is not None
                else "no checkpoint was saved before them")
        return NonFiniteError(
            f"{len(self._in_a_row)} steps in a row ({first}-{last}) had a NaN/Inf "
            f"{' or '.join(whats)} and were skipped; {kept}",
            fix="lower the learning rate or check the data, then rerun (or raise "
            "train_loop.train.max_consecutive_skipped_steps)")

    def log_summary(self) -> None:
        if self._policy == "skip_update" and self.skipped:
            log.warning("Skipped updates (NaN/Inf) at %d step(s): %s", len(self.skipped),
                        _step_ranges(self.skipped))


def _nonfinite_quantity(step_metrics: Mapping[str, jax.Array]) -> str:
    """The first non-finite quantity of the chain loss -> gradient -> update."""
    if not math.isfinite(float(step_metrics["loss"])):
        return "loss"
    if not math.isfinite(float(step_metrics["grad_norm"])):
        return "gradient"
    return "update"


def _step_ranges(skipped: list[tuple[int, str]]) -> str:
    """[(5, 'loss'), (6, 'loss'), (9, 'update')] -> '5-6 (loss), 9 (update)'."""
    groups: list[list] = []
    for step, what in skipped:
        if groups and groups[-1][1] == step - 1 and groups[-1][2] == what:
            groups[-1][1] = step
        else:
            groups.append([step, step, what])
    return ", ".join(f"{a}-{b} ({what})" if a != b else f"{a} ({what})"
                     for a, b, what in groups)


def _write_operative_config(model_dir: str) -> None:
    """Creates MODEL_DIR and writes the config there; a NotWritableError if it cannot."""
    try:
        storage.write_text(run_dir.operative_config(model_dir), gin.operative_config_str())
    except OSError as e:
        steps = checkpoints.committed_steps(run_dir.checkpoints(model_dir))
        reason = f"{e.strerror}: {e.filename}" if e.strerror else f"{type(e).__name__}: {e}"
        raise errors.NotWritableError(
            f"MODEL_DIR {model_dir} is not writable ({reason}); "
            + (f"its checkpoints (latest: step {steps[-1]}) are intact" if steps
               else "nothing was written"),
            fix="make it writable or choose another MODEL_DIR, then rerun") from e


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


def _saved_shard_positions(checkpointer: checkpoints.Checkpointer,
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
