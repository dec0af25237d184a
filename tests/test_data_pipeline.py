"""SeqioDataSource: batch contract, packing invariants, exact resume, host sharding."""

import importlib
import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from data import tasks
from t5x_like.data import pipeline
from t5x_like.data.pipeline import SeqioDataSource, position_header

TASK = "pydocs_span_corruption"
LENGTHS = {"inputs": 64, "targets": 16}
ENC = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DEC = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
       "decoder_segment_ids", "decoder_positions")
SENTINEL_FLOOR = 8000  # ids >= this are the 100 sentinels (vocab 8000 + extra ids)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_batch_keys_shapes_dtypes():
    source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS)
    assert source.model_feature_lengths() == {**{k: 64 for k in ENC}, **{k: 16 for k in DEC}}
    batch = next(source.iterator(per_host_batch_size=4, shard_index=0, num_shards=1,
                                 start_step=0))
    assert set(batch) == set(ENC + DEC)
    for key, value in batch.items():
        assert value.dtype == np.int32
        assert value.shape == (4, 64 if key.startswith("encoder") else 16), key


def _check_packed_row(tokens, segments, positions):
    real = segments > 0
    n = real.sum()
    assert real[:n].all() and not real[n:].any()        # padding only at the end
    assert (np.diff(segments[:n]) >= 0).all() and (segments[0] == 1 or n == 0)
    np.testing.assert_array_equal(tokens != 0, real)    # PAD exactly where segment 0
    for seg in np.unique(segments[:n]):
        np.testing.assert_array_equal(positions[segments == seg],
                                      np.arange((segments == seg).sum()))
    assert not positions[n:].any()


def test_packed_segments_positions_and_loss_weights():
    source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                             shuffle=False)
    for b in _take(source.iterator(per_host_batch_size=4, shard_index=0, num_shards=1,
                                   start_step=0), 3):
        for i in range(4):
            _check_packed_row(b["encoder_input_tokens"][i], b["encoder_segment_ids"][i],
                              b["encoder_positions"][i])
            _check_packed_row(b["decoder_target_tokens"][i], b["decoder_segment_ids"][i],
                              b["decoder_positions"][i])
            seg, tgt, inp = (b["decoder_segment_ids"][i], b["decoder_target_tokens"][i],
                             b["decoder_input_tokens"][i])
            np.testing.assert_array_equal(b["decoder_loss_weights"][i], seg > 0)
            # Teacher forcing: inputs are targets shifted right, restarting at 0 per segment.
            for s in np.unique(seg[seg > 0]):
                t = tgt[seg == s]
                np.testing.assert_array_equal(inp[seg == s], np.concatenate([[0], t[:-1]]))
        assert (b["decoder_loss_weights"][b["decoder_target_tokens"] == 0] == 0).all()


def _assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_resume_from_saved_position_or_by_replay_equals_uninterrupted_run(caplog):
    source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                             seed=5)
    kwargs = dict(per_host_batch_size=4, shard_index=0, num_shards=1)
    running = source.iterator(start_step=0, **kwargs)
    _take(running, 3)
    position = running.position()
    full = _take(running, 3)
    assert position_header(position)["step"] == 3
    assert len(position) < 400_000      # shuffle buffer + packing window, compressed

    _assert_same_batches(full, _take(source.iterator(start_step=3, position=position,
                                                     **kwargs), 3))
    _assert_same_batches(full, _take(source.iterator(start_step=3, **kwargs), 3))
    assert "not using the saved input position" not in caplog.text


def test_a_position_of_another_pipeline_is_not_applied_and_replay_takes_over(caplog):
    kwargs = dict(per_host_batch_size=4, shard_index=0, num_shards=1)
    other = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS, seed=1)
    running = other.iterator(start_step=0, **kwargs)
    _take(running, 2)
    source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS, seed=5)
    expected = _take(source.iterator(start_step=2, **kwargs), 2)
    with caplog.at_level("WARNING"):
        got = _take(source.iterator(start_step=2, position=running.position(), **kwargs), 2)
    _assert_same_batches(expected, got)
    assert "the pipeline changed: seed 1 -> 5" in caplog.text
    header = source.iterator(start_step=2, **kwargs).position().split(b"\n")[0]
    with caplog.at_level("WARNING"):
        got = _take(source.iterator(start_step=2, position=header + b"\nnot zlib", **kwargs),
                    2)
    _assert_same_batches(expected, got)
    assert "it could not be restored (error" in caplog.text


def _token_stream(batches):
    """Original token stream of unpacked batches (sentinels expanded back)."""
    out = []
    for b in batches:
        for enc, dec in zip(b["encoder_input_tokens"], b["decoder_target_tokens"]):
            enc, dec = enc[enc > 1], dec[dec > 1]  # strip PAD and EOS
            spans, cur = {}, None
            for t in dec:
                if t >= SENTINEL_FLOOR:
                    spans[t], cur = [], t
                else:
                    spans[cur].append(t)
            for t in enc:
                out.extend(spans[t] if t >= SENTINEL_FLOOR else [t])
    return np.array(out)


def test_two_shards_cover_the_source_exactly_once():
    with open(tasks.SPLIT_FILES["validation"], encoding="utf-8") as f:
        docs = [line.rstrip("\n") for line in f]
    vocab = tasks.pydocs_vocabulary()
    source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                             split="validation", shuffle=False, pack=False)
    streams = []
    for shard in (0, 1):
        expected = np.concatenate([vocab.encode_tf(tf.constant(d)).numpy()
                                   for d in docs[shard::2]])
        batches = _take(source.iterator(per_host_batch_size=8, shard_index=shard,
                                        num_shards=2, start_step=0),
                        len(expected) // (8 * 70) + 2)  # 70 tokens per chunk: > 1 epoch
        stream = _token_stream(batches)
        assert len(stream) > len(expected)
        np.testing.assert_array_equal(stream[:len(expected)], expected)
        streams.append(stream)
    # Together exactly the source documents, each once (odd and even lines).
    assert len(docs[0::2]) + len(docs[1::2]) == len(docs)
    assert not np.array_equal(streams[0][:500], streams[1][:500])


def test_shards_and_seeds_change_batches():
    def first(**kw):
        # Unshuffled (fast start): seeds then act through the span masks alone.
        source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                                 seed=kw.pop("seed", 0), shuffle=False)
        return next(source.iterator(per_host_batch_size=4, start_step=0, **kw))
    a = first(shard_index=0, num_shards=2)
    np.testing.assert_array_equal(a["encoder_input_tokens"],
                                  first(shard_index=0, num_shards=2)["encoder_input_tokens"])
    assert not np.array_equal(a["encoder_input_tokens"],
                              first(shard_index=1, num_shards=2)["encoder_input_tokens"])
    assert not np.array_equal(a["encoder_input_tokens"],
                              first(shard_index=0, num_shards=2, seed=1)["encoder_input_tokens"])


def test_thread_count_changes_speed_never_batches(monkeypatch):
    """The default pool follows the cores this process may use (2..32), and any pool
    size yields the same batches, so a run resumed on another host streams on."""
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert pipeline.default_threads() == 2
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(96)))
    assert pipeline.default_threads() == 24
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(240)))
    assert pipeline.default_threads() == 32
    batches = {}
    for threads in (None, 1, 8):
        source = SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths=LENGTHS,
                                 threads=threads)
        batches[threads] = _take(source.iterator(per_host_batch_size=4, shard_index=0,
                                                 num_shards=1, start_step=0), 3)
        assert source.stream_identity() == SeqioDataSource(
            mixture_or_task_name=TASK, task_feature_lengths=LENGTHS).stream_identity()
    for threads in (1, 8):
        for got, want in zip(batches[threads], batches[None]):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_clear_errors():
    with pytest.raises(ValueError, match=r"did you mean \['pydocs_span_corruption'"):
        SeqioDataSource(mixture_or_task_name="pydocs_span_corupt",
                        task_feature_lengths=LENGTHS)
    short = SeqioDataSource(mixture_or_task_name=TASK,
                            task_feature_lengths={"inputs": 4, "targets": 16})
    with pytest.raises(ValueError, match="too short for span corruption"):
        short.iterator(per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0)
    with pytest.raises(ValueError, match="needs lengths for features"):
        SeqioDataSource(mixture_or_task_name=TASK, task_feature_lengths={"inputs": 64})
    missing = "/nonexistent/dir/missing_vocab.model"
    vocab = seqio.SentencePieceVocabulary(missing)
    seqio.TaskRegistry.add(
        "test_missing_vocab", source=seqio.TextLineDataSource(
            {"train": str(tasks.SPLIT_FILES["validation"])}),
        preprocessors=[], output_features={"targets": seqio.Feature(vocab)})
    try:
        with pytest.raises(FileNotFoundError, match=missing):
            SeqioDataSource(mixture_or_task_name="test_missing_vocab",
                            task_feature_lengths={"targets": 16})
    finally:
        seqio.TaskRegistry.remove("test_missing_vocab")


def test_registering_twice_is_fine():
    importlib.reload(tasks)
    tasks.register()
    assert TASK in seqio.TaskRegistry.names()


def test_tensorflow_sees_no_gpu():
    pipeline.configure_tensorflow()
    assert tf.config.get_visible_devices("GPU") == []
