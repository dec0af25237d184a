import numpy as np
import pytest

from t5x_like.data import host_batches


class TaggedRows:
    """Rows tagged with (shard, step, row); its position is b'shard:step'."""

    def __init__(self, *, shard, step, rows):
        self.shard, self.step, self.rows = shard, step, rows

    def __next__(self):
        rows = [[self.shard, self.step, r] for r in range(self.rows)]
        self.step += 1
        return {"x": np.asarray(rows, np.int32)}

    def position(self):
        return f"{self.shard}:{self.step}".encode()


class RecordingSource:
    """Remembers which shards were opened, at which step, from which position."""

    def __init__(self):
        self.opened = []

    def iterator(self, *, per_host_batch_size, shard_index, num_shards, start_step,
                 position=None):
        self.opened.append((shard_index, num_shards, start_step, position))
        step = start_step if position is None else int(position.split(b":")[1])
        return TaggedRows(shard=shard_index, step=step, rows=per_host_batch_size)


def global_batches(process_count, *, num_data_shards=4, start_step=5, steps=3):
    per_process = []
    for p in range(process_count):
        source = RecordingSource()
        it = host_batches.HostBatches(source, global_batch_size=8,
                                      num_data_shards=num_data_shards, process_index=p,
                                      process_count=process_count, start_step=start_step)
        per_process.append(([next(it)["x"] for _ in range(steps)], source.opened))
    batches = [np.concatenate([b[s] for b, _ in per_process]) for s in range(steps)]
    return batches, [opened for _, opened in per_process]


def test_each_process_opens_only_its_own_shards_at_the_step():
    _, opened = global_batches(2)
    assert opened == [[(0, 4, 5, None), (1, 4, 5, None)], [(2, 4, 5, None), (3, 4, 5, None)]]


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
        host_batches.HostBatches(RecordingSource(), global_batch_size=6, num_data_shards=4,
                                 process_index=0, process_count=1, start_step=0)


def test_positions_saved_by_two_processes_resume_in_one_and_back():
    """Each process saves its own shards' positions; after a restart on another
    process count every shard continues from its own position."""
    def open_processes(count, positions=None, start_step=0):
        return [host_batches.HostBatches(
            RecordingSource(), global_batch_size=8, num_data_shards=4, process_index=p,
            process_count=count, start_step=start_step, positions=positions)
            for p in range(count)]

    two = open_processes(2)
    for _ in range(3):
        [next(h) for h in two]
    saved = {s: pos for h in two for s, pos in h.positions().items()}
    assert saved == {s: f"{s}:3".encode() for s in range(4)}

    (one,) = open_processes(1, saved, start_step=3)
    np.testing.assert_array_equal(next(one)["x"][:, :2], [[s, 3] for s in range(4) for _ in range(2)])
    again = open_processes(2, one.positions(), start_step=4)
    assert [h.positions() for h in again] == [{0: b"0:4", 1: b"1:4"}, {2: b"2:4", 3: b"3:4"}]
