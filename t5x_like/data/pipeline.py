"""seqio task -> per-shard numpy batches, deterministic, resumable in constant time.

`SeqioDataSource` is all the trainer needs from the data layer: it knows the
model-side feature lengths (for abstract init and compilation) and opens one
iterator per data shard, yielding int32 numpy arrays of shape [B, L]. The core turns
them into global arrays with `jax.make_array_from_process_local_data`.

Determinism: tf.data determinism is forced on and every random choice (seqio's
shuffle, span-corruption masks) is seeded from `seed` and the shard index, so the same
(seed, shard_index, num_shards) always yields the same batches.

Resuming: each shard iterator can say where it is (`position()`, bytes), and
`iterator(position=...)` continues from exactly there. The position is the tf.data
iterator's own saved state (as T5X checkpoints its input iterator;
data/iterator_state.py), compressed, behind a JSON header naming its pipeline. It is
exact for every task, mixture and source, and restoring it costs the same at any
step; the price is its size (the shuffle buffer and packing window: benchmarks/
RESULTS.md, "Resume"). A position from another pipeline (task, lengths, seed, batch,
shards) or an unreadable one is never applied: the shard replays `start_step`
batches instead (exact, slower with the step), and the log says so.

Feature converters (`feature_converter`, described in converters.py): 'enc_dec'
(T5), 'lm' (decoder-only causal LM, targets-only tasks) and 'prefix_lm' (decoder-only
prefix LM); all pack with segment ids/positions as seqio does. Before the first batch
each task is checked to yield data on this shard, so an empty or all-bad source fails
with a message instead of hanging in an endless repeat of nothing.

Throughput: benchmarks/RESULTS.md, "Data pipeline".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
from typing import Any, Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5x_like import errors
from t5x_like.data import converters, iterator_state, seqio_converters

log = logging.getLogger(__name__)

# Threads of TensorFlow's own (eager) runtime. The tf.data pool is per pipeline
# (SeqioDataSource.threads). JAX owns the host's cores during the step.
_TF_INTER_OP_THREADS = 2
# Host shard seeds are spread apart so no two hosts draw the same span masks.
_SHARD_SEED_STRIDE = 1_000_003
_POSITION_FORMAT = 1


@functools.cache
def configure_tensorflow() -> None:
    """Keeps TF off the accelerators and off most host threads (idempotent).

    JAX must own the GPUs: if TF saw them it would reserve their memory. Must run before
    TF initialises its runtime; if something else initialised it first, we log and go
    on (the data pipeline only runs CPU ops either way).
    """
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # runtime already initialised
        log.warning("could not hide GPUs from TensorFlow: %s", e)
    try:
        tf.config.threading.set_inter_op_parallelism_threads(_TF_INTER_OP_THREADS)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError as e:
        log.warning("could not limit TensorFlow threads: %s", e)


def default_threads() -> int:
    """tf.data threads per pipeline when none are set: a quarter of this process's
    cores, 2 to 32. On a 2-core machine the default run asks for about 1% of what 2
    threads produce, and 1 or 2 threads or no pipeline at all step at the same speed
    (RESULTS.md); an accelerator host, whose cores the step leaves free, gets more."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return min(32, max(2, cores // 4))


def _registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def _lookup(name: str) -> seqio.Task | seqio.Mixture:
    """Finds a registered task or mixture, or says which module to import."""
    if name not in _registered_names():
        names = _registered_names()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise errors.ConfigError(
            f"unknown seqio task or mixture {name!r}{hint} Registered: {len(names)} "
            f"names{' e.g. ' + str(names[:10]) if names else ''}",
            fix="import the module that registers it first: in gin, `import data.tasks` "
            "registers the bundled pydocs_* tasks (repository checkout), and "
            "`@user_tasks.register_text_task()` etc. register your own (README, "
            "'Your own data')")
    return seqio.get_mixture_or_task(name)


def _tasks_of(provider: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _check_vocab_files(provider: seqio.Task | seqio.Mixture) -> None:
    for task in _tasks_of(provider):
        for name, feature in task.output_features.items():
            vocab = feature.vocabulary
            path = getattr(vocab, "sentencepiece_model_file", None)
            if path and not tf.io.gfile.exists(path):
                raise errors.InputNotFoundError(
                    f"vocabulary file for task {task.name!r} feature {name!r} not "
                    f"found: {path}", fix="correct the vocabulary path of the task")


def _shard_info(shard_index: int, num_shards: int) -> seqio.ShardInfo | None:
    """None for a single host: the same data, and sources that cannot list their
    shards (TFDS mocks, generated datasets) still work."""
    return None if num_shards == 1 else seqio.ShardInfo(index=shard_index,
                                                        num_shards=num_shards)


# (task, split, shard, num_shards, lengths) already seen to yield data.
_NONEMPTY_CHECKED: set = set()


def _check_yields_data(provider: seqio.Task | seqio.Mixture, *, split: str,
                       lengths: Mapping[str, int], shard_index: int,
                       num_shards: int) -> None:
    """Raises if a task yields no example on this shard (one epoch, unshuffled).

    Empty or whitespace-only files, or files whose every record is skipped, would
    otherwise make the endless repeat spin forever without a batch. Costs one
    example per task and is done once per process.
    """
    for task in _tasks_of(provider):
        key = (task.name, split, shard_index, num_shards, tuple(sorted(lengths.items())))
        if key in _NONEMPTY_CHECKED:
            continue
        if task.source.splits and split not in task.source.splits:
            raise errors.ConfigError(f"task {task.name!r} has no split {split!r}",
                                     fix=f"use one of {list(task.source.splits)}")
        ds = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1,
                              shard_info=_shard_info(shard_index, num_shards))
        if next(iter(ds.take(1)), None) is None:
            raise errors.DataError(
                f"task {task.name!r} split {split!r} (shard {shard_index} of "
                f"{num_shards}) yields no examples: its source is empty, whitespace "
                "only, or every record was skipped as bad (see the logged counts)",
                fix="check the files the task reads (or use fewer data shards than "
                "files)")
        _NONEMPTY_CHECKED.add(key)


# ---------------------------------------------------------------------------
# One shard's iterator and its saved position.
# ---------------------------------------------------------------------------

class ShardIterator:
    """One data shard's batches as numpy, and where it is (`position()`)."""

    def __init__(self, dataset: tf.data.Dataset, *, pipeline: Mapping[str, Any],
                 step: int):
        self._iterator = iter(dataset)
        self._pipeline = dict(pipeline)
        self.step = step              # batches this shard has yielded since step 0

    def __iter__(self) -> ShardIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.step += 1
        return {name: value.numpy() for name, value in batch.items()}

    def position(self) -> bytes:
        """Where this shard is: restores with `SeqioDataSource.iterator(position=)`.

        A JSON header line (format, step, the pipeline's identity) and the
        tf.data iterator state (data/iterator_state.py). Call between batches.
        """
        header = {"format": _POSITION_FORMAT, "step": self.step, "pipeline": self._pipeline}
        return (json.dumps(header, sort_keys=True).encode() + b"\n"
                + iterator_state.save(self._iterator))

    def restore(self, position: bytes) -> None:
        """Moves this (fresh) iterator to a saved position of the same pipeline."""
        _, state = position.split(b"\n", 1)
        iterator_state.restore(self._iterator, state)


def position_header(position: bytes) -> dict[str, Any]:
    """The JSON header of a saved position: format, step and pipeline identity."""
    return json.loads(position.split(b"\n", 1)[0])


# ---------------------------------------------------------------------------
# The source.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class SeqioDataSource:
    """A seqio task/mixture as endless, shardable iterators that resume exactly.

    threads / prefetch_batches: the tf.data thread pool of each shard's pipeline and
    the batches it prepares ahead. They change speed, never the batches. `threads`
    defaults to a quarter of the cores this process may run on, at least 2 and at
    most 32 (`default_threads`); see benchmarks/RESULTS.md ("Data pipeline" for
    throughput at 2 and 8 threads, "The launcher against the step" for why the
    pipeline does not slow the step on 2 cores).

    soft_prompt_length: N placeholder tokens in front of every example's inputs, for
    a prompt-tuned model with a prompt of N vectors (finetuning/prompt_tuning.py);
    the encoder (or prefix) is then N longer than task_feature_lengths says.
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    shuffle: bool = True
    seed: int = 0
    pack: bool = True
    use_cached: bool = False
    feature_converter: str = "enc_dec"
    threads: int | None = None
    prefetch_batches: int = 2
    soft_prompt_length: int = 0

    def __post_init__(self):
        converter = converters.get(self.feature_converter)
        converters.check_soft_prompt(self.feature_converter, self.soft_prompt_length)
        for key, length in self.task_feature_lengths.items():
            if not isinstance(length, (int, np.integer)) or length <= 0:
                raise errors.ConfigError(
                    f"task_feature_lengths[{key!r}] is {length!r}, not a positive int",
                    fix="correct TASK_FEATURE_LENGTHS (e.g. {'inputs': 512, "
                    "'targets': 114})")
        if (self.threads is not None and self.threads < 1) or self.prefetch_batches < 0:
            raise errors.ConfigError(
                f"SeqioDataSource threads={self.threads} and prefetch_batches="
                f"{self.prefetch_batches}", fix="use threads >= 1 and prefetch_batches >= 0")
        provider = _lookup(self.mixture_or_task_name)
        _check_vocab_files(provider)
        consumed = converter.consumes
        for task in _tasks_of(provider):
            missing = sorted(set(task.output_features) - set(self.task_feature_lengths))
            if missing:
                raise errors.ConfigError(
                    f"task {task.name!r} needs lengths for features {missing}; got "
                    f"{dict(self.task_feature_lengths)}",
                    fix="add them to TASK_FEATURE_LENGTHS")
            if set(task.output_features) != set(consumed):
                raise errors.ConfigError(
                    f"feature_converter {self.feature_converter!r} consumes features "
                    f"{list(consumed)} but task {task.name!r} emits "
                    f"{sorted(task.output_features)}",
                    fix="use 'lm' for targets-only tasks and 'enc_dec' or 'prefix_lm' "
                    "for inputs/targets tasks")
        extra = sorted(set(self.task_feature_lengths) - set(consumed))
        if extra:
            raise errors.ConfigError(
                f"task_feature_lengths has {extra}, which feature_converter "
                f"{self.feature_converter!r} does not use",
                fix=f"give only {list(consumed)}")

    def eval_sources(self, *, split: str = "validation") -> dict[str, SeqioDataSource]:
        """{task: an unshuffled source of its `split`}, for every task of this source
        (each member of a mixture), with this source's lengths, converter, packing
        and seed: the data that in-loop eval and launch.eval score. Tasks without
        the split are left out, with a warning."""
        sources = {}
        for task in _tasks_of(_lookup(self.mixture_or_task_name)):
            if task.source.splits and split not in task.source.splits:
                log.warning("task %r has no %r split (it has %s): not evaluated.",
                            task.name, split, list(task.source.splits))
                continue
            sources[task.name] = dataclasses.replace(
                self, mixture_or_task_name=task.name, split=split, shuffle=False)
        return sources

    def prediction_metrics(self, *, split: str = "validation",
                           num_examples: int | None = None):
        """The seqio `metric_fns` of this source's tasks on model predictions
        (`task_eval.PredictionMetrics`), or None when no task defines any."""
        if not any(task.metric_fns and (not task.source.splits or split in task.source.splits)
                   for task in _tasks_of(_lookup(self.mixture_or_task_name))):
            return None
        from t5x_like.data import task_eval
        return task_eval.PredictionMetrics(
            mixture_or_task_name=self.mixture_or_task_name,
            task_feature_lengths=self.task_feature_lengths,
            feature_converter=self.feature_converter, split=split,
            num_examples=num_examples, soft_prompt_length=self.soft_prompt_length)

    def model_feature_lengths(self) -> dict[str, int]:
        """Lengths of the batch features the model sees, e.g. encoder_input_tokens."""
        return converters.model_feature_lengths(
            self.task_feature_lengths, converter=self.feature_converter, pack=self.pack,
            soft_prompt_length=self.soft_prompt_length)

    def check(self, *, shard_index: int, num_shards: int) -> None:
        """Raises a RunError now if this shard cannot yield examples: a source that is
        empty (or all bad records), lengths too short for the objective. Reads one
        example per task; train() calls it before building the model."""
        configure_tensorflow()
        _check_yields_data(_lookup(self.mixture_or_task_name), split=self.split,
                           lengths=self.task_feature_lengths, shard_index=shard_index,
                           num_shards=num_shards)

    def dataset(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                start_step: int = 0) -> tf.data.Dataset:
        """The batched tf.data pipeline behind `iterator`, replaying `start_step`
        batches (exposed for tests and benchmarks)."""
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        if per_host_batch_size <= 0 or start_step < 0:
            raise ValueError("per_host_batch_size must be > 0 and start_step >= 0")
        configure_tensorflow()
        provider = _lookup(self.mixture_or_task_name)
        _check_yields_data(provider, split=self.split, lengths=self.task_feature_lengths,
                           shard_index=shard_index, num_shards=num_shards)
        ds = seqio.get_dataset(
            provider,
            task_feature_lengths=dict(self.task_feature_lengths),
            feature_converter=seqio_converters.build(
                self.feature_converter, pack=self.pack,
                soft_prompt_length=self.soft_prompt_length),
            dataset_split=self.split,
            use_cached=self.use_cached,
            shuffle=self.shuffle,
            num_epochs=None,
            shard_info=_shard_info(shard_index, num_shards),
            seed=self.seed + _SHARD_SEED_STRIDE * shard_index,
            verbose=False,
        )
        ds = ds.batch(per_host_batch_size, drop_remainder=True)
        ds = ds.skip(start_step)
        ds = ds.map(lambda b: {k: tf.cast(v, tf.int32) for k, v in b.items()})
        options = tf.data.Options()
        options.deterministic = True
        options.threading.private_threadpool_size = self.threads or default_threads()
        return ds.with_options(options).prefetch(self.prefetch_batches)

    def stream_identity(self) -> dict[str, Any]:
        """What defines this source's stream of examples: every setting but the speed
        ones (threads, prefetch). train() records it in each checkpoint and warns when a
        resumed run's differs; `seed` here, not the run's init seed, seeds the stream."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("threads", "prefetch_batches")}
        settings["task_feature_lengths"] = dict(self.task_feature_lengths)
        if not self.soft_prompt_length:     # as streams were named before prompt tuning
            del settings["soft_prompt_length"]
        return json.loads(json.dumps(settings, sort_keys=True))  # as JSON reads back

    def vocabulary_size(self) -> int:
        """Ids of the largest vocabulary among the tasks' features, sentinels (extra
        ids) included: the model's vocab_size must cover it."""
        provider = _lookup(self.mixture_or_task_name)
        return max(feature.vocabulary.vocab_size for task in _tasks_of(provider)
                   for feature in task.output_features.values())

    def _identity(self, *, per_host_batch_size: int, shard_index: int,
                  num_shards: int) -> dict[str, Any]:
        """What a saved position must match to be applied (speed settings aside)."""
        return {**self.stream_identity(), "per_host_batch_size": per_host_batch_size,
                "shard_index": shard_index, "num_shards": num_shards}

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int, position: bytes | None = None) -> ShardIterator:
        """This shard's batches from `start_step` on, forever: dict of int32 [B, L].

        With `position` (saved by `ShardIterator.position()` at `start_step`) the
        iterator continues from it in constant time; without one, or if it belongs to
        a different pipeline, it replays `start_step` batches. The pipeline is built
        here, not on the first next(), so configuration errors (e.g. lengths too
        short for the objective) surface at the call.
        """
        identity = self._identity(per_host_batch_size=per_host_batch_size,
                                  shard_index=shard_index, num_shards=num_shards)
        problem = None if position is None else self._unusable(position, identity,
                                                               start_step)
        if position is not None and problem is None:
            shard = ShardIterator(self.dataset(per_host_batch_size=per_host_batch_size,
                                               shard_index=shard_index,
                                               num_shards=num_shards),
                                  pipeline=identity, step=start_step)
            try:
                shard.restore(position)
                return shard
            except iterator_state.UNREADABLE as e:
                problem = f"it could not be restored ({type(e).__name__}: {e})"
        if problem:
            log.warning("Data shard %d: not using the saved input position (%s); "
                        "replaying %d batches instead (exact, but slower as the step "
                        "grows).", shard_index, problem, start_step)
        return ShardIterator(self.dataset(per_host_batch_size=per_host_batch_size,
                                          shard_index=shard_index, num_shards=num_shards,
                                          start_step=start_step),
                             pipeline=identity, step=start_step)

    @staticmethod
    def _unusable(position: bytes, identity: Mapping[str, Any], step: int) -> str | None:
        """Why a saved position cannot be applied here, or None if it can."""
        try:
            header = position_header(position)
        except (ValueError, UnicodeDecodeError):
            return "its header is unreadable"
        if header.get("format") != _POSITION_FORMAT:
            return f"format {header.get('format')} is not {_POSITION_FORMAT}"
        if header.get("step") != step:
            return f"it was saved at step {header.get('step')}, not {step}"
        saved = header.get("pipeline", {})
        changed = sorted(k for k in set(saved) | set(identity)
                         if saved.get(k) != identity.get(k))
        if changed:
            return "the pipeline changed: " + ", ".join(
                f"{k} {saved.get(k)!r} -> {identity.get(k)!r}" for k in changed)
        return None
