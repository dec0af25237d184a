"""seqio task -> per-host numpy batches, deterministic and resumable from a step.

`SeqioDataSource` is the only thing the trainer needs from the data layer: it knows
the model-side feature lengths (for abstract init and compilation) and yields this
host's share of every global batch, as int32 numpy arrays of shape [B, L]. The core
turns them into global arrays with `jax.make_array_from_process_local_data`.

Determinism: tf.data determinism is forced on and every random choice (seqio's
shuffle, span-corruption masks) is seeded from `seed` and the shard index, so the same
(seed, shard_index, num_shards) always yields the same batches.

Resuming: `iterator(start_step=k)` rebuilds the pipeline and discards the first k
batches (`Dataset.skip`). That is exact (it replays precisely what an uninterrupted
run produced) and needs no iterator checkpoint; the cost grows with k (the time the
pipeline took to make those k batches: ~12 s per 1000 packed batches of 16x128 on a
2-core machine), which is fine at our scale. Saving tf.data iterator state is the
upgrade when restarts after many thousands of steps become slow.

Feature converters (`feature_converter`): 'enc_dec' (T5), 'lm' (decoder-only causal
LM, targets-only tasks) and 'prefix_lm' (decoder-only prefix LM: inputs ++ targets in
one row, `decoder_causal_attention` marks the bidirectional prefix, loss on the
targets only); all pack with segment ids/positions as seqio does. Before the first
batch each task is checked to yield data on this shard, so an empty or all-bad source
fails with a message instead of hanging in an endless repeat of nothing.

Throughput on 2 shared cores: see benchmarks/RESULTS.md ("Data pipeline"); about
2,000 packed 512/114 span-corruption sequences/s with the bundled tasks' in-memory
cache of tokenized documents, ~630/s without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import logging
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

# Threads tf.data may use for this pipeline. JAX owns the host's cores during the
# step. Measured on 2 shared cores (16x128 packed): 97 batches/s with 2 threads,
# 98 with TF's default pool (all cores, +17% CPU time), 107 with 1: the pipeline is
# bound by sequential stages, so a small private pool costs nothing.
PRIVATE_THREADPOOL_SIZE = 2
PREFETCH_BATCHES = 2
# Host shard seeds are spread apart so no two hosts draw the same span masks.
_SHARD_SEED_STRIDE = 1_000_003


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
        logging.warning("could not hide GPUs from TensorFlow: %s", e)
    try:
        tf.config.threading.set_inter_op_parallelism_threads(PRIVATE_THREADPOOL_SIZE)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError as e:
        logging.warning("could not limit TensorFlow threads: %s", e)


def _registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def _lookup(name: str) -> seqio.Task | seqio.Mixture:
    """Finds a task or mixture; imports the repo's `data.tasks` once if needed."""
    if name not in _registered_names():
        try:  # the bundled registrations; absent when the library is used alone
            importlib.import_module("data.tasks")
        except ModuleNotFoundError:
            pass
    if name not in _registered_names():
        names = _registered_names()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown seqio task or mixture {name!r}{hint} Registered: {len(names)} "
            f"names{' e.g. ' + str(names[:10]) if names else ''}. Import the module "
            "that registers it (e.g. `data.tasks`) first.")
    return seqio.get_mixture_or_task(name)


def _tasks_of(provider: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _check_vocab_files(provider: seqio.Task | seqio.Mixture) -> None:
    for task in _tasks_of(provider):
        for name, feature in task.output_features.items():
            vocab = feature.vocabulary
            path = getattr(vocab, "sentencepiece_model_file", None)
            if path and not tf.io.gfile.exists(path):
                raise FileNotFoundError(
                    f"vocabulary file for task {task.name!r} feature {name!r} not "
                    f"found: {path}")


# name -> (converter class, the task features it consumes). seqio conventions, so
# T5X-style models read the batches unchanged:
#   enc_dec    encoder_* [B, inputs], decoder_* [B, targets]
#   lm         decoder_* [B, targets]; loss on every real token
#   prefix_lm  decoder_* [B, inputs + targets] holding inputs ++ targets, plus
#              decoder_causal_attention (1 on the prefix and one position after it:
#              bidirectional there); loss on the targets part only
_CONVERTERS = {
    "enc_dec": (seqio.EncDecFeatureConverter, ("inputs", "targets")),
    "lm": (seqio.LMFeatureConverter, ("targets",)),
    "prefix_lm": (functools.partial(seqio.PrefixLMFeatureConverter,
                                    loss_on_targets_only=True), ("inputs", "targets")),
}
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
            raise ValueError(f"task {task.name!r} has no split {split!r}; it has "
                             f"{list(task.source.splits)}")
        ds = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1,
                              shard_info=_shard_info(shard_index, num_shards))
        if next(iter(ds.take(1)), None) is None:
            raise ValueError(
                f"task {task.name!r} split {split!r} (shard {shard_index} of "
                f"{num_shards}) yields no examples: its source is empty, whitespace "
                "only, or every record was skipped as bad (see the logged counts).")
        _NONEMPTY_CHECKED.add(key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeqioDataSource:
    """A seqio task/mixture as an endless, shardable, resumable batch iterator."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    shuffle: bool = True
    seed: int = 0
    pack: bool = True
    use_cached: bool = False
    feature_converter: str = "enc_dec"

    def __post_init__(self):
        if self.feature_converter not in _CONVERTERS:
            raise ValueError(f"feature_converter {self.feature_converter!r} is not "
                             f"supported; choose from {sorted(_CONVERTERS)}")
        for key, length in self.task_feature_lengths.items():
            if not isinstance(length, (int, np.integer)) or length <= 0:
                raise ValueError(f"task_feature_lengths[{key!r}] must be a positive "
                                 f"int, got {length!r}")
        provider = _lookup(self.mixture_or_task_name)
        _check_vocab_files(provider)
        consumed = _CONVERTERS[self.feature_converter][1]
        for task in _tasks_of(provider):
            missing = sorted(set(task.output_features) - set(self.task_feature_lengths))
            if missing:
                raise ValueError(f"task {task.name!r} needs lengths for features "
                                 f"{missing}; got {dict(self.task_feature_lengths)}")
            if set(task.output_features) != set(consumed):
                raise ValueError(
                    f"feature_converter {self.feature_converter!r} consumes features "
                    f"{list(consumed)} but task {task.name!r} emits "
                    f"{sorted(task.output_features)}; use 'lm' for targets-only tasks and "
                    "'enc_dec' or 'prefix_lm' for inputs/targets tasks.")
        extra = sorted(set(self.task_feature_lengths) - set(consumed))
        if extra:
            raise ValueError(f"task_feature_lengths has {extra}, which feature_converter "
                             f"{self.feature_converter!r} does not use; give only "
                             f"{list(consumed)}")

    def _converter(self) -> seqio.FeatureConverter:
        return _CONVERTERS[self.feature_converter][0](pack=self.pack)

    def model_feature_lengths(self) -> dict[str, int]:
        """Lengths of the batch features the model sees, e.g. encoder_input_tokens."""
        lengths = self._converter().get_model_feature_lengths(
            dict(self.task_feature_lengths))
        return {k: int(v) for k, v in lengths.items()}

    def dataset(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                start_step: int = 0) -> tf.data.Dataset:
        """The batched tf.data pipeline behind `iterator` (exposed for tests/benchmarks)."""
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
            feature_converter=self._converter(),
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
        options.threading.private_threadpool_size = PRIVATE_THREADPOOL_SIZE
        return ds.with_options(options).prefetch(PREFETCH_BATCHES)

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Yields this host's batches from `start_step` on, forever: dict of int32 [B, L].

        The pipeline is built here, not on the first next(), so configuration errors
        (e.g. lengths too short for the objective) surface at the call.
        """
        ds = self.dataset(per_host_batch_size=per_host_batch_size,
                          shard_index=shard_index, num_shards=num_shards,
                          start_step=start_step)
        return ds.as_numpy_iterator()
