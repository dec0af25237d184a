import numpy as np
import pytest

from t5x_like import host_batches


class RecordingSource:
    """Rows tagged with (shard, step, row); remembers which shards were opened."""

    def __init__(self):
        self.opened = []

    def iterator(self, *, per_host_batch_size, shard_index, num_shards, start_step):
        self.opened.append((shard_index, num_shards, start_step))
        step = start_step
        while True:
            rows = [[shard_index, step, r] for r in range(per_host_batch_size)]
            yield {"x": np.asarray(rows, np.int32)}
            step += 1


def global_batches(process_count, *, num_data_shards=4, start_step=5, steps=3):
    per_process = []
    for p in range(process_count):
        source = RecordingSource()
        it = host_batches.host_batches(source, global_batch_size=8,
                                       num_data_shards=num_data_shards, process_index=p,
                                       process_count=process_count, start_step=start_step)
        per_process.append(([next(it)["x"] for _ in range(steps)], source.opened))
    batches = [np.concatenate([b[s] for b, _ in per_process]) for s in range(steps)]
    return batches, [opened for _, opened in per_process]


def test_each_process_opens_only_its_own_shards_at_the_step():
    _, opened = global_batches(2)
    assert opened == [[(0, 4, 5), (1, 4, 5)], [(2, 4, 5), (3, 4, 5)]]


def test_global_batches_do_not_depend_on_the_process_count():
    one, _ = global_batches(1)
    for count in (2, 4):
        many, _ = global_batches(count)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)
    # Rows [2s, 2s+2) of every global batch come from shard s, at the right step.
    np.testing.assert_array_equal(one[0][:, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    assert set(one[2][:, 1]) == {7}


def test_shards_must_divide_over_processes_and_batch():
    with pytest.raises(ValueError, match="multiple of the process count"):
        host_batches.owned_shards(num_data_shards=3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="multiple of num_data_shards"):
        next(host_batches.host_batches(RecordingSource(), global_batch_size=6,
                                       num_data_shards=4, process_index=0, process_count=1,
                                       start_step=0))
