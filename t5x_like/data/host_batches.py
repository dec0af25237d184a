"""This process's rows of every global batch, the same whatever the process count.

The input is split into `num_data_shards` fixed shards. Global batch rows
[s*B/S, (s+1)*B/S) always come from shard s, and process p reads only the shards
it owns (a contiguous block of them). So a run on 1 process and a run on 2
processes with the same `num_data_shards` see identical global batches, and a job
can be restarted on a different number of hosts without changing its data.

Each shard also says where it is (`positions()`: shard -> bytes), and the
checkpoint stores one position per shard. A restart, on any process count that
divides `num_data_shards`, hands each process the positions of the shards it now
owns, so every shard continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import numpy as np

from t5x_like import errors
from t5x_like.data.contract import DataSource


def owned_shards(*, num_data_shards: int, process_index: int, process_count: int
                 ) -> range:
    if num_data_shards % process_count:
        raise errors.ConfigError(
            f"num_data_shards={num_data_shards} is not a multiple of the process count "
            f"({process_count}), so some process would own part of a shard",
            fix="set train_loop.train.num_data_shards to a multiple of the process count")
    per_process = num_data_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class HostBatches(Iterator[dict[str, np.ndarray]]):
    """Yields this process's [global_batch_size / process_count, ...] slices."""

    def __init__(self, source: DataSource, *, global_batch_size: int,
                 num_data_shards: int, process_index: int, process_count: int,
                 start_step: int, positions: Mapping[int, bytes] | None = None):
        """`positions`: saved shard -> position at `start_step` (None: replay from 0)."""
        if global_batch_size % num_data_shards:
            raise errors.ConfigError(
                f"global batch size {global_batch_size} is not a multiple of "
                f"num_data_shards={num_data_shards}",
                fix="change BATCH_SIZE or train_loop.train.num_data_shards")
        self.shards = owned_shards(num_data_shards=num_data_shards,
                                   process_index=process_index, process_count=process_count)
        positions = positions or {}
        self._iterators = [source.iterator(
            per_host_batch_size=global_batch_size // num_data_shards, shard_index=s,
            num_shards=num_data_shards, start_step=start_step, position=positions.get(s))
            for s in self.shards]

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iterators]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def positions(self) -> dict[int, bytes]:
        """{shard: position} of the shards this process owns, after the last batch."""
        return {s: it.position() for s, it in zip(self.shards, self._iterators)}
