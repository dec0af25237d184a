"""The adapters over library internals, against the installed libraries: each does its
job, and every internal it reaches for still exists (an upgrade that removes one
fails here, naming it, before it fails a run)."""

import os
import zlib

import jax
import numpy as np
import pytest
import tensorboardX
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t5x_like import errors
from t5x_like.data import iterator_state
from t5x_like.reporting import event_files
from t5x_like.training import jax_coordination


def _dataset():
    return tf.data.Dataset.range(100).shuffle(10, seed=0).batch(4)


def test_a_fresh_iterator_restored_from_saved_bytes_yields_the_next_batches():
    running = iter(_dataset())
    first = [next(running).numpy() for _ in range(3)]
    state = iterator_state.save(running)
    rest = [batch.numpy() for batch in running]
    assert len(rest) == 22        # 25 batches of 4 from 100 elements, 3 already taken
    assert sorted(np.concatenate(first + rest)) == list(range(100))

    fresh = iter(_dataset())
    iterator_state.restore(fresh, state)
    restored = [batch.numpy() for batch in fresh]
    assert len(restored) == 22
    for want, got in zip(rest, restored):
        np.testing.assert_array_equal(want, got)
    # The stored format: zlib over tf.io.serialize_tensor of the iterator's variant.
    assert tf.io.parse_tensor(zlib.decompress(state), tf.variant).dtype == tf.variant


def test_bytes_that_are_not_a_saved_state_raise_what_the_caller_falls_back_on():
    for bad in (b"not zlib", zlib.compress(b"not a tensor")):
        with pytest.raises(iterator_state.UNREADABLE):
            iterator_state.restore(iter(_dataset()), bad)


def test_event_files_read_back_with_the_exact_scalars(tmp_path):
    events = event_files.EventFile(str(tmp_path / "events"))
    events.write_scalars(10, {"loss": 5.5, "accuracy": 0.25}, wall_time=1_800_000_000.5)
    events.write_scalars(20, {"loss": 4.25}, wall_time=1_800_000_060.5)
    events.flush()
    (name,) = os.listdir(tmp_path)
    assert name.startswith("events.out.tfevents.")
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert [(e.wall_time, e.step, e.value) for e in accumulator.Scalars("loss")] == [
        (1_800_000_000.5, 10, 5.5), (1_800_000_060.5, 20, 4.25)]
    assert [(e.step, e.value) for e in accumulator.Scalars("accuracy")] == [(10, 0.25)]
    events.close()


def test_event_files_of_a_url_scheme_go_through_the_given_opener(tmp_path):
    opened = []

    def open_file(path):          # a stand-in object store: one local folder
        opened.append(path)
        return open(tmp_path / os.path.basename(path), "wb")

    event_files.open_urls_with("adaptertest", open_file)
    events = event_files.EventFile("adaptertest://bucket/run/events", filename_suffix=".0")
    events.write_scalars(7, {"loss": 3.0}, wall_time=1_800_000_000.0)
    events.close()
    assert len(opened) == 1 and opened[0].startswith("adaptertest://bucket/run/events.out.")
    assert opened[0].endswith(".0")
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(7, 3.0)]


def test_no_coordination_client_without_jax_distributed():
    assert jax.process_count() == 1
    assert jax_coordination.coordination_client() is None


@pytest.mark.parametrize("adapter", [iterator_state, event_files, jax_coordination],
                         ids=lambda adapter: adapter.__name__)
def test_every_internal_an_adapter_uses_exists_in_the_installed_library(adapter):
    adapter.check_internals()     # raises LibraryChangedError naming the missing symbol


def test_a_missing_internal_is_one_line_naming_it_and_both_versions():
    with pytest.raises(errors.LibraryChangedError) as raised:
        errors.library_internal("tensorboardX.event_file_writer.NoSuchWriter",
                                verified="2.6.5", adapter="t5x_like.reporting.event_files")
    assert raised.value.one_line() == (
        f"tensorboardX {tensorboardX.__version__} has no "
        "tensorboardX.event_file_writer.NoSuchWriter, which t5x_like.reporting.event_files "
        "uses (verified with tensorboardX 2.6.5) — install tensorboardX 2.6.5, or update "
        f"t5x_like.reporting.event_files to tensorboardX {tensorboardX.__version__}")
    with pytest.raises(errors.LibraryChangedError, match="has no jax._src.no_such_module.x"):
        errors.library_internal("jax._src.no_such_module.x", verified="0.10.2",
                                adapter="t5x_like.training.jax_coordination")
    with pytest.raises(errors.LibraryChangedError, match="OwnedIterator._iterator_resource"):
        iterator_state.save(object())
