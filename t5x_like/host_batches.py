"""This process's rows of every global batch, the same whatever the process count.

The input is split into `num_data_shards` fixed shards. Global batch rows
[s*B/S, (s+1)*B/S) always come from shard s, and process p reads only the shards
it owns (a contiguous block of them). So a run on 1 process and a run on 2
processes with the same `num_data_shards` see identical global batches, and a job
can be restarted on a different number of hosts without changing its data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np


class ShardableSource(Protocol):
    def iterator(self, *, per_host_batch_size: int, shard_index: int, num_shards: int,
                 start_step: int) -> Iterator[dict[str, np.ndarray]]: ...


def owned_shards(*, num_data_shards: int, process_index: int, process_count: int
                 ) -> range:
    if num_data_shards % process_count:
        raise ValueError(
            f"num_data_shards={num_data_shards} must be a multiple of the process count "
            f"({process_count}) so that every process owns whole shards.")
    per_process = num_data_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def host_batches(source: ShardableSource, *, global_batch_size: int, num_data_shards: int,
                 process_index: int, process_count: int, start_step: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's [global_batch_size / process_count, ...] slices."""
    if global_batch_size % num_data_shards:
        raise ValueError(f"global batch size {global_batch_size} must be a multiple of "
                         f"num_data_shards={num_data_shards}.")
    rows_per_shard = global_batch_size // num_data_shards
    shards = owned_shards(num_data_shards=num_data_shards, process_index=process_index,
                          process_count=process_count)
    iterators = [source.iterator(per_host_batch_size=rows_per_shard, shard_index=s,
                                 num_shards=num_data_shards, start_step=start_step)
                 for s in shards]
    if len(iterators) == 1:
        yield from iterators[0]
        return
    while True:
        parts: list[Mapping[str, np.ndarray]] = [next(it) for it in iterators]
        yield {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
