"""User data: text / JSONL / TFRecord globs and TFDS (mocked), bad records counted and
skipped, clear errors, vocabularies chosen in gin."""

import itertools
import json

import gin
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data import tasks
from t5x_like.data import user_tasks
from t5x_like.data import sources as data_sources, vocabularies
from t5x_like.data.pipeline import SeqioDataSource

VOCAB = tasks.pydocs_vocabulary()
GOOD = ["first document about lists", "second one, on dicts", "third: sets and tuples"]


def _lm_stream(name, n_tokens, *, vocabulary=VOCAB):
    source = SeqioDataSource(mixture_or_task_name=name, task_feature_lengths={"targets": 16},
                             feature_converter="lm", shuffle=False, pack=False)
    it = source.iterator(per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0)
    return np.concatenate([b["decoder_target_tokens"].reshape(-1)
                           for b in itertools.islice(it, n_tokens // 32 + 1)])[:n_tokens]


def _expected(texts, vocabulary=VOCAB):
    return np.concatenate([np.append(vocabulary.encode_tf(tf.constant(t)).numpy(), 1)
                           for t in texts])


@pytest.fixture(autouse=True)
def _fresh_counts():
    data_sources.reset_skip_counts()


def test_text_files_skip_and_count_bad_lines(tmp_path):
    (tmp_path / "a.txt").write_bytes(
        f"{GOOD[0]}\n\n   \nbad \xff\xfe bytes\n{GOOD[1]}\n".encode("latin-1"))
    (tmp_path / "b.txt").write_bytes(f"\t\n{GOOD[2]}\n\xc0\xaf\n".encode("latin-1"))
    name = user_tasks.register_text_task(name="t_text", patterns=str(tmp_path / "*.txt"),
                                         objective="lm", vocabulary=VOCAB)
    expected = _expected(GOOD)
    np.testing.assert_array_equal(_lm_stream(name, len(expected)), expected)
    counts = data_sources.skip_counts()
    assert counts[("t_text", "undecodable")] % 2 == 0 and counts[("t_text", "undecodable")] >= 2
    assert counts[("t_text", "empty")] >= 3   # per epoch: 2 undecodable, 3 blank


def test_jsonl_field_and_bad_lines(tmp_path):
    lines = [json.dumps({"body": GOOD[0], "id": 1}), "{not json", json.dumps({"id": 2}),
             json.dumps({"body": 7}), json.dumps(["body"]), json.dumps({"body": "  "}),
             json.dumps({"body": GOOD[1]}), ""]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "y.jsonl").write_bytes(json.dumps({"body": GOOD[2]}).encode() + b"\n\xff{\n")
    name = user_tasks.register_jsonl_task(name="t_jsonl", patterns=str(tmp_path / "*.jsonl"),
                                          objective="lm", field="body", vocabulary=VOCAB)
    expected = _expected(GOOD)
    np.testing.assert_array_equal(_lm_stream(name, len(expected)), expected)
    counts = data_sources.skip_counts()
    assert counts[("t_jsonl", "invalid_json")] >= 2      # '{not json', b'\xff{'
    assert counts[("t_jsonl", "missing_field")] >= 3     # no field, int field, a list
    assert counts[("t_jsonl", "empty")] >= 2             # '  ' and the blank line


def test_tfrecord_text_feature(tmp_path):
    path = str(tmp_path / "docs.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for text in [GOOD[0], None, GOOD[1], GOOD[2]]:
            feats = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))}
            if text is not None:
                feats["text"] = tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[text.encode()]))
            w.write(tf.train.Example(features=tf.train.Features(feature=feats))
                    .SerializeToString())
    name = user_tasks.register_tfrecord_task(name="t_rec", patterns=path, objective="lm",
                                             vocabulary=VOCAB)
    expected = _expected(GOOD)
    np.testing.assert_array_equal(_lm_stream(name, len(expected)), expected)
    assert data_sources.skip_counts()[("t_rec", "empty")] >= 1


def test_tfds_c4_style_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=8):
        name = user_tasks.register_tfds_task(name="t_c4", tfds_name="c4/en:3.1.0",
                                             data_dir="/nonexistent/tfds",
                                             objective="span_corruption", vocabulary=VOCAB)
        source = SeqioDataSource(mixture_or_task_name=name,
                                 task_feature_lengths={"inputs": 32, "targets": 8})
        batch = next(source.iterator(per_host_batch_size=2, shard_index=0, num_shards=1,
                                     start_step=0))
    assert batch["encoder_input_tokens"].shape == (2, 32)
    assert (batch["encoder_input_tokens"][:, 0] > 0).all()
    assert (batch["decoder_target_tokens"] >= 8000).any()   # sentinels: span corruption


def test_clear_errors_for_bad_input(tmp_path):
    missing = str(tmp_path / "nothing-*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        user_tasks.register_text_task(name="t_none", patterns=missing, objective="lm")
    with pytest.raises(FileNotFoundError, match="no_such.model"):
        vocabularies.sentencepiece(path=str(tmp_path / "no_such.model"))
    with pytest.raises(ValueError, match="unknown objective"):
        user_tasks.register_text_task(name="t_x", patterns=str(tasks.SPLIT_FILES["train"]),
                                      objective="mlm")
    (tmp_path / "blank.txt").write_text(" \n\t\n\n")
    user_tasks.register_text_task(name="t_blank", patterns=str(tmp_path / "blank.txt"),
                                  objective="span_corruption", vocabulary=VOCAB)
    source = SeqioDataSource(mixture_or_task_name="t_blank",
                             task_feature_lengths={"inputs": 32, "targets": 8})
    with pytest.raises(ValueError, match="yields no examples"):
        source.iterator(per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0)
    with pytest.raises(ValueError, match="has no split 'test'"):
        SeqioDataSource(mixture_or_task_name="pydocs_lm", split="test", feature_converter="lm",
                        task_feature_lengths={"targets": 8}).iterator(
            per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0)


def test_byte_vocabulary_span_corruption(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(GOOD * 3) + "\n")
    vocab = vocabularies.byte()
    user_tasks.register_text_task(name="t_bytes", patterns=str(tmp_path / "d.txt"),
                                  objective="span_corruption", vocabulary=vocab)
    source = SeqioDataSource(mixture_or_task_name="t_bytes", shuffle=False, pack=False,
                             task_feature_lengths={"inputs": 64, "targets": 16})
    b = next(source.iterator(per_host_batch_size=2, shard_index=0, num_shards=1, start_step=0))
    inputs, targets = b["encoder_input_tokens"][0], b["decoder_target_tokens"][0]
    assert vocab.vocab_size == 359 and inputs.max() == 358      # first sentinel on top
    spans, cur = {}, None                                       # undo the corruption
    for t in targets[targets > 1]:
        if t >= 259:
            spans[t], cur = [], t
        else:
            spans[cur].append(t)
    tokens = [u for t in inputs[inputs > 1] for u in (spans[t] if t >= 259 else [t])]
    assert bytes(int(t) - 3 for t in tokens).decode() == "".join(GOOD * 3)[:len(tokens)]
    assert len(tokens) > 60


def test_gin_registers_a_user_task_with_a_chosen_vocabulary(tmp_path):
    (tmp_path / "u.txt").write_text("\n".join(GOOD) + "\n")
    gin.clear_config()
    try:
        gin.parse_config(f"""
from __gin__ import dynamic_registration
from t5x_like.data import pipeline
from t5x_like.data import user_tasks
from t5x_like.data import vocabularies

pipeline.SeqioDataSource:
  mixture_or_task_name = @user_tasks.register_text_task()
  task_feature_lengths = {{'targets': 16}}
  feature_converter = 'lm'
user_tasks.register_text_task:
  name = 't_gin'
  patterns = {{'train': '{tmp_path}/u.txt'}}
  objective = 'lm'
  vocabulary = @vocabularies.sentencepiece()
vocabularies.sentencepiece.path = '{tasks.VOCAB_PATH}'
""")
        source = gin.get_configurable(SeqioDataSource)()
    finally:
        gin.clear_config()
    assert source.mixture_or_task_name == "t_gin"
    expected = _expected(GOOD)
    np.testing.assert_array_equal(_lm_stream("t_gin", len(expected)), expected)


def test_the_package_ships_the_bundled_vocabulary_byte_for_byte():
    """The default vocabulary lives in the package (t5x_like/data/vocab, package data)
    and is the model data/build_corpus.py reproduces (digest in SOURCE.md)."""
    import hashlib
    import pathlib
    shipped = pathlib.Path(vocabularies.BUNDLED_SENTENCEPIECE)
    assert shipped.parent.parent == pathlib.Path(vocabularies.__file__).parent
    assert shipped.read_bytes() == tasks.VOCAB_PATH.read_bytes()
    source_md = (tasks.DATA_DIR / "corpus" / "SOURCE.md").read_text()
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() in source_md
