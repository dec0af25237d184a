"""The one contract between the data layer and everything that reads batches.

Training, in-loop evaluation, launch.eval and the benchmarks all take a `DataSource`
(data/pipeline.py's `SeqioDataSource` is the real one; data/synthetic.py has a
TensorFlow-free one for tests). Batches come per data shard, so any process count
that divides the shard count sees the same global batches (data/host_batches.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class ShardIterator(Protocol):
    """One shard's batches ({name: [rows, L]}) and where it is."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def position(self) -> bytes:
        """Restores with the source's `iterator(position=...)`; call between batches."""
        ...


class DataSource(Protocol):
    """A stream of packed, tokenized batches, split into shards.

    `iterator` opens one data shard at `start_step`, continuing from `position` (what
    the shard's `position()` returned at that step, saved in the checkpoint) when
    given; without one it must reach the step by itself (e.g. by replaying).

    A source with validation data also has `eval_sources(*, split)`: {task name: a
    DataSource of that task's `split`, unshuffled} (every member of a mixture), each
    yielding the same features. Evaluation asks for it and says so in one line when a
    source has none, so it is left out of this Protocol's required members.
    """

    def model_feature_lengths(self) -> Mapping[str, int]: ...

    def check(self, *, shard_index: int, num_shards: int) -> None:
        """Raises a RunError if this shard cannot yield batches (e.g. an empty source,
        lengths too short for the objective). Cheap: runs before the model is built."""

    def stream_identity(self) -> Mapping[str, Any]:
        """JSON-able settings that define the stream of batches (seed included)."""

    def vocabulary_size(self) -> int:
        """Token ids the data can contain (all features' vocabularies, sentinels too)."""

    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int, position: bytes | None = None) -> ShardIterator: ...
