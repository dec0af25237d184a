"""Evaluating a run's checkpoints: one step, the newest, or all, now or as they come.

`launch.eval` calls `evaluate_checkpoints` (configured by gin, like `train()`). For
each checkpoint it restores the parameters only, then reports per task:
  * teacher-forced loss, cross-entropy, perplexity and accuracy on the first
    `eval_batches` batches of the validation split: the numbers in-loop eval gives
    for the same parameters (evaluation/teacher_forced.py);
  * for tasks that define seqio `metric_fns`, those metrics on the model's
    predictions decoded with the task's vocabulary and postprocessed
    (data/task_eval.py), keyed '<predictor>/<metric>', e.g.
    'greedy/exact_match' (evaluation/predictions.py says what a predictor is).
Scores go to TensorBoard (MODEL_DIR/eval/<task>) and to one JSON file per step,
MODEL_DIR/eval/checkpoint_<step>.json (with a few decoded predictions next to their
targets), written whole or not at all. Those files are
the memory of what is done: a rerun skips every step whose file holds the same
settings (split, batches, batch size, predictor, examples), so `checkpoint='all'`
after more training evaluates only the new checkpoints, and `watch=True` can be
stopped and restarted at any time. Delete a file to evaluate its step again.

With `watch`, the directory is polled while a training job writes to it, until the
run's final step is evaluated or no new checkpoint has appeared for `timeout_s`.
Without it, a missing directory, no checkpoint, or a step that does not exist is an
error before anything is built or compiled.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np

from t5x_like import run_dir, storage
from t5x_like.checkpointing import base_model, checkpoints
from t5x_like.evaluation import teacher_forced
from t5x_like.reporting import metrics as metrics_lib
from t5x_like.evaluation import predictions

log = logging.getLogger(__name__)

MODES = ("latest", "all")
# Decoded predictions kept in each step's JSON record, per task, to read by eye.
EXAMPLES_IN_RECORD = 8


class NoCheckpointError(ValueError):
    """There is no checkpoint to evaluate, or not the one asked for."""


def parse_checkpoint(value: str | int) -> str | int:
    """'latest', 'all', or a step number."""
    if value in MODES:
        return value
    try:
        step = int(value)
    except (TypeError, ValueError):
        step = -1
    if step < 0:
        raise ValueError(f"--checkpoint must be 'latest', 'all' or a step number, "
                         f"got {value!r}")
    return step


class EvalRecords:
    """The JSON file of each evaluated step, and which steps are done (a local folder
    or a URL: storage.py)."""

    def __init__(self, directory: str, *, settings: dict[str, Any]):
        self.directory = directory
        self.settings = settings

    def path(self, step: int) -> str:
        return storage.join(self.directory, f"checkpoint_{step}.json")

    def done(self) -> set[int]:
        """Steps evaluated before with these settings."""
        steps = set()
        for name in storage.list_dir(self.directory):
            if not (name.startswith("checkpoint_") and name.endswith(".json")):
                continue
            try:
                record = json.loads(storage.read_text(storage.join(self.directory, name)))
            except (OSError, ValueError):
                continue              # unreadable: evaluate that step again
            if record.get("settings") == self.settings:
                steps.add(int(record["step"]))
        return steps

    def write(self, step: int, results: dict[str, dict[str, float]], *,
              examples: dict[str, list[tuple[str, str]]]) -> None:
        record = {"step": step, "settings": self.settings, "tasks": results,
                  "examples": {task: [{"target": t, "prediction": p} for t, p in pairs]
                               for task, pairs in examples.items()}}
        # Whole or not at all: a crash leaves no half-written record.
        storage.write_text(self.path(step), json.dumps(record, indent=2, sort_keys=True))


def _existing_steps(directory: str) -> list[int]:
    if not storage.is_dir(directory):
        return []
    reader = checkpoints.CheckpointReader(directory)
    try:
        return reader.steps()
    finally:
        reader.close()


def _check_request(directory: str, mode: str | int, watch: bool) -> None:
    """Refuses, before any work, what cannot be evaluated now (unless watching)."""
    if watch:
        return
    steps = _existing_steps(directory)
    if not steps:
        raise NoCheckpointError(
            f"no checkpoints in {directory} — train first (python -m launch.train with "
            "the same gin files), check MODEL_DIR, or pass --watch to wait for them")
    if isinstance(mode, int) and mode not in steps:
        raise NoCheckpointError(f"checkpoint step {mode} does not exist in {directory} — "
                                f"steps there: {steps}")


def _steps_to_evaluate(mode: str | int, available: list[int], done: set[int]) -> list[int]:
    if mode == "all":
        return [s for s in available if s not in done]
    wanted = available[-1:] if mode == "latest" else [s for s in available if s == mode]
    for step in wanted:
        if step in done:
            log.info("Checkpoint step %d was evaluated before with these settings; "
                     "skipped.", step)
    return [s for s in wanted if s not in done]


def _as_on_process_0(values: list[int]) -> list[int]:
    """Process 0's `values` on every process. Evaluating is collective, so all
    processes must pick the same steps and stop together, even when a checkpoint or a
    record appears between their looks at the directory."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    padded = np.zeros(count, np.int64)
    padded[:min(count, len(values))] = values[:count]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)]


class StepEvaluator:
    """Everything one checkpoint's evaluation needs, built once: the teacher-forced
    evaluator, the task metrics with their predictor, and where results go."""

    def __init__(self, *, run: Any, records: EvalRecords, eval_batches: int, split: str,
                 predictor: predictions.Predictor, num_examples: int | None):
        partitioner = run.partitioner()
        layout = run.state_layout(partitioner, run.feature_lengths())
        self.abstract_params = layout.model_params.abstract_with_shardings()
        self.model = run.model
        self.loaded_bases: dict[str, Any] = {}     # an adapter run's frozen base, once
        self._teacher_forced = teacher_forced.evaluator_for_run(
            run=run, partitioner=partitioner,
            param_shardings=layout.model_params.shardings,
            num_batches=eval_batches, logdir=None, split=split)
        self._scorer = (run.train_data.prediction_metrics(split=split,
                                                          num_examples=num_examples)
                        if hasattr(run.train_data, "prediction_metrics") else None)
        bound = dict(model=run.model, partitioner=partitioner,
                     param_shardings=layout.model_params.shardings)
        scorer = self._scorer
        self._predict = (predictor.bind(**bound, max_decode_length=scorer.max_target_length)
                         if scorer and scorer.needs_predictions else None)
        self._score = (predictions.log_likelihood_fn(**bound)
                       if scorer and scorer.needs_scores else None)
        self._predictor_name = predictor.name
        self._batch_size = run.batch_size
        self._records = records
        self._writers: dict[str, metrics_lib.TensorBoardWriter] = {}

    def evaluate(self, step: int, params: Any) -> dict[str, dict[str, float]]:
        """{task: scores} of `params` (checkpoint `step`); logged, written to
        TensorBoard and to the step's record by process 0."""
        scores = self._teacher_forced.evaluate(step, params)
        examples = {}
        if self._scorer is not None:
            predict, score = self._predict, self._score
            decoded, examples = self._scorer.evaluate(
                predict=None if predict is None else lambda batch: predict(params, batch),
                score=None if score is None else lambda batch: score(params, batch),
                batch_size=self._batch_size)
            for task, values in decoded.items():
                named = {f"{self._predictor_name}/{name}": v for name, v in values.items()}
                scores.setdefault(task, {}).update(named)
                log.info("eval step %d | %s | %s", step, task, " | ".join(
                    f"{name} {value:.2f}" for name, value in named.items()))
        if jax.process_index() == 0:
            for task, values in scores.items():
                if task not in self._writers:
                    self._writers[task] = metrics_lib.TensorBoardWriter(
                        logdir=storage.join(self._records.directory, task))
                self._writers[task].write_scalars(step, values)
            self._records.write(step, scores, examples={
                task: pairs[:EXAMPLES_IN_RECORD] for task, pairs in examples.items()})
            log.info("Checkpoint step %d evaluated: %s", step, self._records.path(step))
        return scores

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
        for writer in self._writers.values():
            writer.close()


def evaluate_checkpoints(*, run: Any, model_dir: str, checkpoint: str | int = "latest",
                         watch: bool = False, timeout_s: float = 3600.0,
                         poll_s: float = 10.0, final_step: int | None = None,
                         eval_batches: int = 10, split: str = "validation",
                         predictor: predictions.Predictor = predictions.Decoded(),
                         num_examples: int | None = None
                         ) -> dict[int, dict[str, dict[str, float]]]:
    """Evaluates checkpoints of the run in `model_dir`; returns {step: {task: scores}}
    for the steps evaluated by this call.

    Args:
      run: the RunConfig the checkpoints were trained with (its model, mesh shape,
        batch size and data: the validation split of the same task).
      checkpoint: 'latest', 'all', or a step number.
      watch: keep polling for new checkpoints (every `poll_s`) until `final_step`
        is evaluated or none has appeared for `timeout_s` seconds.
      final_step: the run's last step (gin: %TRAIN_STEPS).
      eval_batches: teacher-forced metrics over this many batches per task.
      predictor: what the seqio metric_fns score (evaluation/predictions.py): by default the
        model's greedy decoding, at most the task's target length.
      num_examples: score metric_fns on the first N examples of each task (all
        when None).
    """
    mode = parse_checkpoint(checkpoint)
    model_dir = storage.resolve(model_dir)
    directory = run_dir.checkpoints(model_dir)
    _check_request(directory, mode, watch)
    records = EvalRecords(run_dir.eval_dir(model_dir), settings={
        "split": split, "eval_batches": eval_batches, "batch_size": run.batch_size,
        "predictor": predictor.settings, "num_examples": num_examples})
    evaluator = StepEvaluator(run=run, records=records, eval_batches=eval_batches,
                              split=split, predictor=predictor, num_examples=num_examples)
    results: dict[int, dict[str, dict[str, float]]] = {}
    reader, seen, last_new = None, set(), time.monotonic()
    try:
        while True:
            if reader is None and storage.is_dir(directory):
                reader = checkpoints.CheckpointReader(directory)
            available = reader.steps() if reader else []
            if set(available) - seen:
                seen.update(available)
                last_new = time.monotonic()
            for step in _as_on_process_0(_steps_to_evaluate(mode, available,
                                                             records.done())):
                try:
                    params = base_model.restore_model_params(
                        reader, step, model=evaluator.model,
                        abstract_params=evaluator.abstract_params,
                        loaded_bases=evaluator.loaded_bases)
                except Exception:
                    if not watch or step in reader.steps():
                        raise
                    # The training job's keep_checkpoints removed it meanwhile.
                    log.warning("Checkpoint step %d was deleted before it could be "
                                "evaluated; skipped.", step)
                    continue
                results[step] = evaluator.evaluate(step, params)
            if not watch:
                break
            target = mode if isinstance(mode, int) else final_step
            finished = target is not None and target in records.done()
            timed_out = time.monotonic() - last_new > timeout_s
            finished, timed_out = _as_on_process_0([finished, timed_out])
            if finished:
                log.info("Step %d is evaluated; stopped watching.", target)
                break
            if timed_out:
                log.info("No new checkpoint in %s for %.0f s; stopped watching.",
                         directory, timeout_s)
                break
            time.sleep(poll_s)
    finally:
        if reader is not None:
            reader.close()
        evaluator.close()
    return results
