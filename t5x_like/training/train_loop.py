"""`train()`: the whole training run, readable top to bottom.

What is trained comes in as one `RunConfig` (model, optimizer, data, mesh, batch;
see training/run_config.py); how the loop is driven (steps, checkpoints, logging) are the
other arguments. Everything is injected (from gin by `launch/train.py`, or directly
from Python in tests), so this function holds only the order of events:

  checks (settings, MODEL_DIR, data) -> mesh -> state layout -> restore or init ->
  data positioned at the step ->
  [batch -> global arrays -> step (compiled at the first batch) -> metrics ->
   async checkpoint]* -> final save

Whatever a person can fix is raised as an `errors.RunError` (the launcher prints it
as one line), and is checked before the expensive part where it can be.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

import gin
import jax

from t5x_like import errors, run_dir, storage
from t5x_like.config import argument_types
from t5x_like.checkpointing import base_model, checkpoints
from t5x_like.checkpointing.init_from import InitFrom
from t5x_like.finetuning import trainable
from t5x_like.reporting import device_peaks
from t5x_like.evaluation import teacher_forced
from t5x_like.reporting import metrics as metrics_lib
from t5x_like.reporting import param_table
from t5x_like.parallel import partitioning
from t5x_like.training import host_memory, nonfinite, preemption, resume
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
    model, train_data, batch_size = run.model, run.train_data, run.batch_size
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
    if model.trainable_pattern is not None:     # an adapter run: is there a base?
        base_model.check_loadable(init_from)

    # ----------------------------------------------------------- layout, eval data, state
    layout = run.state_layout(partitioner, feature_lengths)
    _report_layout(model_dir, partitioner, layout, write_table=is_lead_host)
    evaluator = teacher_forced.evaluator_for_run(
        run=run, partitioner=partitioner, param_shardings=layout.model_params.shardings,
        num_batches=eval_batches, logdir=run_dir.eval_dir(model_dir)
    ) if eval_every_steps else None
    start = resume.restore_or_init(run=run, checkpointer=checkpointer,
                                   partitioner=partitioner, layout=layout,
                                   feature_lengths=feature_lengths, init_from=init_from)
    state, step = start.state, start.step

    # ----------------------------------------------------------- data, positioned at the step
    data_stream = dict(train_data.stream_identity())
    positions = None if start.saved_data is None else resume.saved_shard_positions(
        checkpointer, start.saved_data, step=step, shards=shards, batch_size=batch_size,
        data_stream=data_stream, num_data_shards=num_data_shards)
    batches = host_batches.HostBatches(
        train_data, global_batch_size=batch_size, num_data_shards=num_data_shards,
        process_index=block.index, process_count=block.count,
        start_step=step, positions=positions)
    data_position = {"step": step, "global_batch_size": batch_size,
                     "data_stream": data_stream, "num_data_shards": num_data_shards}

    # ----------------------------------------------------------- the loop
    train_step = run.jitted_train_step(partitioner, layout, feature_lengths)
    step_log = _StepLog(run=run, feature_lengths=feature_lengths, model_dir=model_dir,
                        start=start, train_steps=train_steps,
                        peak_flops_per_device=peak_flops_per_device, write=is_lead_host)
    guard = nonfinite.NonFiniteGuard(policy=on_nonfinite_loss, checkpointer=checkpointer,
                                     max_consecutive=max_consecutive_skipped_steps)
    watcher = preemption.PreemptionWatcher()
    preempted = watcher.should_stop(step)
    if preempted:                  # SIGTERM during start-up: no step taken, nothing to save
        log.warning("Preempted (SIGTERM) during start-up, before step %d: nothing new to "
                    "save; exiting cleanly. Rerun the same command to resume.", step + 1)
    host_memory.release_freed()                  # what init or restore left freed
    compiled_step = None
    try:
        while step < train_steps and not preempted:
            local_batch = next(batches)
            step_log.add_tokens(model.count_real_tokens(local_batch) * block.count)
            global_batch = partitioning.global_batch(local_batch, partitioner)
            if compiled_step is None:            # compile once, then free what it left
                compiled_step = train_step.lower(state, global_batch,
                                                 *start.frozen_args).compile()
                host_memory.release_freed()
            state, step_metrics = compiled_step(state, global_batch, *start.frozen_args)
            step_log.add(step_metrics)             # on device: the host does not wait
            step += 1
            guard.observe(step, step_metrics)      # checks the previous step: no stall
            step_log.write_pending()               # the previous log point, read now
            checkpointer.raise_if_save_failed()    # a failed background write, now
            preempted = watcher.should_stop(step)
            is_last = step == train_steps
            if is_last or step % log_every_steps == 0:
                step_log.emit(step, closes_interval=step % log_every_steps == 0)
            if is_last or preempted or step % checkpoint_every_steps == 0:
                guard.flush()                      # never save past an unchecked step
                step_log.write_pending()           # nor before its log point
                checkpointer.save(step, state, data_position={
                    **data_position, "step": step, resume.INTERVAL_SUMS: step_log.open_sums()},
                    shard_positions=batches.positions() if block.leads else {},
                    num_data_shards=num_data_shards,
                    base_model=start.base.to_json() if start.base else None)
            if evaluator and not preempted and (is_last or step % eval_every_steps == 0):
                step_log.write_pending()
                evaluator.evaluate(step, trainable.merge(state.params, start.frozen))
            if preempted:
                log.warning("Preempted (SIGTERM): saved step %d; exiting cleanly. Rerun "
                            "the same command to resume.", step)
        guard.flush()
        step_log.write_pending()
    finally:
        guard.log_summary()
        watcher.close()
        checkpointer.close()          # waits for any in-flight async save
        step_log.close()
        if evaluator:
            evaluator.close()
    log.info("Stopped at step %d; checkpoints in %s", step, checkpointer.directory)
    return TrainResult(start_step=start.step, final_step=step, losses=step_log.losses,
                       final_state=state, preempted=preempted)


class _StepLog:
    """The progress line and TensorBoard scalars of the training loop.

    Logged values average the steps since the last multiple of log_every_steps
    (metrics.IntervalMeans); an unfinished interval's sums go into each checkpoint,
    so resuming never splits one. A log point is written one step late: `emit`
    takes the interval's sums while its step runs, `write_pending` reads them after
    the next step is dispatched, so logging every step never leaves the device idle
    while the host formats and writes (RESULTS.md, "The launcher against the step").
    """

    def __init__(self, *, run: RunConfig, feature_lengths: Mapping[str, int],
                 model_dir: str, start: resume.Start, train_steps: int,
                 peak_flops_per_device: float | None, write: bool):
        flops = run.model.training_flops_per_step(feature_lengths=feature_lengths,
                                                  batch_size=run.batch_size)
        peak = peak_flops_per_device or device_peaks.peak_bf16_flops(
            jax.devices()[0].device_kind)
        self._progress = metrics_lib.Progress(
            total_steps=train_steps, start_step=start.step, num_devices=jax.device_count(),
            flops_per_step=flops, peak_flops_per_device=peak)
        self._interval = metrics_lib.IntervalMeans(
            sums=None if start.saved_data is None
            else start.saved_data.get(resume.INTERVAL_SUMS))
        self._writer = metrics_lib.TensorBoardWriter(
            logdir=run_dir.train_events(model_dir)) if write else None
        self._pending: tuple[int, metrics_lib.IntervalSnapshot] | None = None
        self.losses: dict[int, float] = {}   # step -> loss at every logged step

    def add_tokens(self, count: int) -> None:
        self._progress.add_tokens(count)

    def add(self, step_metrics: Mapping[str, jax.Array]) -> None:
        self._interval.add(step_metrics)

    def emit(self, step: int, *, closes_interval: bool) -> None:
        """Makes `step` a log point; a last step off the interval leaves it open."""
        self.write_pending()
        self._pending = (step, self._interval.snapshot())
        if closes_interval:
            self._interval.reset()

    def write_pending(self) -> None:
        """Writes the log point taken last, waiting for its step if still running."""
        if self._pending is None:
            return
        (step, snapshot), self._pending = self._pending, None
        host_metrics = snapshot.means()
        self.losses[step] = host_metrics["loss"]
        rates = self._progress.tick(step)
        log.info(self._progress.line(step, host_metrics, rates))
        if self._writer:
            self._writer.write_scalars(step, {**host_metrics, **rates})

    def open_sums(self) -> Any:
        return self._interval.sums()

    def close(self) -> None:
        """Writes a log point still pending (the step that stopped a run with a
        NaN still gets its line); then closes the event file."""
        try:
            self.write_pending()
        except Exception as e:  # noqa: BLE001 - an error is already on its way out
            log.debug("log point not written on the way out: %s", e)
        if self._writer:
            self._writer.close()


def _report_layout(model_dir: str, partitioner: partitioning.Partitioner,
                   layout: trainer.StateLayout, *, write_table: bool) -> None:
    """Logs the devices and a per-module parameter summary; writes the full table."""
    log.info("Devices: %d (%s), processes: %d, %s", jax.device_count(),
             jax.devices()[0].platform, jax.process_count(), partitioner)
    table_path = run_dir.parameter_table(model_dir)
    params = layout.model_params
    log.info("Parameters (each one, with its sharding, in %s):\n%s", table_path,
             param_table.module_summary(params.abstract))
    if write_table:
        storage.write_text(table_path, param_table.parameter_table(
            params.abstract, params.logical_specs, params.shardings) + "\n")


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
