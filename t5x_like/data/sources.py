"""Reading the user's own text safely: file globs, JSONL, TFRecord, TFDS -> {'text'}.

Every source here yields examples {'text': tf.string} and is a seqio DataSource, so
seqio shards it per host (by file when there are at least as many files as hosts,
else by example) and shuffles its files with the run's seed.

Bad input never reaches the model and never passes silently:
  * a glob that matches nothing fails at construction, naming the pattern;
  * a record that is not valid UTF-8, is empty or whitespace-only, or (JSONL) is not a
    JSON object holding a string field is dropped, counted per (label, reason) in
    `skip_counts()` and logged (first occurrence, then every power of ten);
  * a source that yields nothing at all is caught by SeqioDataSource before training
    (an endless repeat of nothing would otherwise hang).
The counting runs in Python once per batch of records (`_CHECK_BATCH`), not per
record, so it costs nothing measurable.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Iterable, Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5x_like import errors

log = logging.getLogger(__name__)

_CHECK_BATCH = 256
_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()


# ---------------------------------------------------------------------------
# Skip accounting.
# ---------------------------------------------------------------------------

def skip_counts() -> dict[tuple[str, str], int]:
    """{(label, reason): records skipped so far in this process}. Reasons:
    'undecodable' (not UTF-8), 'empty' (empty or whitespace-only), 'invalid_json',
    'missing_field' (JSONL line without a string `field`)."""
    with _lock:
        return dict(_counts)


def reset_skip_counts() -> None:
    with _lock:
        _counts.clear()


def record_skips(label: str, reason: str, n: int, example: bytes = b"") -> None:
    """Adds n skips; logs the first and each time the count passes a power of ten."""
    if n <= 0:
        return
    with _lock:
        before = _counts[(label, reason)]
        _counts[(label, reason)] = after = before + n
    if before == 0 or len(str(after)) > len(str(before)):
        log.warning("%s: skipped %d %s record(s) so far (e.g. %r)", label, after, reason,
                    example[:60])


# ---------------------------------------------------------------------------
# Dropping bad text, counted: a preprocessor for any source.
# ---------------------------------------------------------------------------

def clean_text(dataset: tf.data.Dataset, *, key: str = "text",
               label: str = "text") -> tf.data.Dataset:
    """Drops records whose `key` is not valid UTF-8 or is blank; counts each skip.

    Input: scalar strings or dicts with a scalar string `key`; output: {key: text}
    (other features are dropped: pretraining objectives use only the text).
    Validity is decided in the graph (transcoding UTF-8 -> UTF-8 with errors ignored
    changes exactly the invalid strings); Python only adds up the counts.
    """
    if isinstance(dataset.element_spec, tf.TensorSpec):
        dataset = dataset.map(lambda line: {key: line})
    dataset = dataset.map(lambda ex: ex[key]).batch(_CHECK_BATCH)

    def count(text, valid, blank):
        valid, blank = valid.numpy(), blank.numpy()
        text = text.numpy()
        if not valid.all():
            record_skips(label, "undecodable", int((~valid).sum()), text[~valid][0])
        if (valid & blank).any():
            record_skips(label, "empty", int((valid & blank).sum()))
        return valid & ~blank

    def check(text):
        valid = tf.equal(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8",
                                                      errors="ignore"), text)
        blank = tf.equal(tf.strings.length(tf.strings.strip(text)), 0)
        keep = tf.py_function(count, [text, valid, blank], tf.bool)
        keep.set_shape(text.shape)
        return tf.data.Dataset.from_tensor_slices(tf.boolean_mask(text, keep))
    return dataset.flat_map(check).map(lambda text: {key: text})


# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------

Patterns = str | Iterable[str] | Mapping[str, str | Iterable[str]]


def _split_files(patterns: Patterns) -> dict[str, list[str]]:
    """{split: sorted files}; a bare pattern (or list of them) is the 'train' split."""
    if isinstance(patterns, str) or not isinstance(patterns, Mapping):
        patterns = {"train": patterns}
    out = {}
    for split, pattern in patterns.items():
        globs = [pattern] if isinstance(pattern, str) else list(pattern)
        files = sorted({f for g in globs for f in tf.io.gfile.glob(g)})
        if not files:
            raise errors.InputNotFoundError(
                f"no files match {pattern!r} (split {split!r})",
                fix="correct the task's `patterns` (a glob, a list, or {split: glob})")
        out[split] = files
    return out


def text_files(*, patterns: Patterns) -> seqio.FileDataSource:
    """One document per line of plain-text files (UTF-8)."""
    return seqio.FileDataSource(
        read_file_fn=lambda path: tf.data.TextLineDataset(path).map(
            lambda line: {"text": line}),
        split_to_filepattern=_split_files(patterns))


def jsonl_files(*, patterns: Patterns, field: str = "text",
                label: str | None = None) -> seqio.FileDataSource:
    """One JSON object per line; the document is its string `field`.

    JSON has no tf.data parser, so lines are decoded in Python, a batch at a time.
    Lines that are not JSON objects, or lack a string `field`, are counted and skipped.
    """
    label = label or f"jsonl:{field}"

    def parse(lines):
        texts, bad_json, missing, example = [], 0, 0, b""
        for line in lines.numpy():
            if not line.strip():
                texts.append(b"")  # counted as 'empty' by clean_text
                continue
            try:
                obj = json.loads(line)
            except ValueError:  # includes UnicodeDecodeError
                bad_json, example = bad_json + 1, line
                continue
            value = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                missing, example = missing + 1, line
                continue
            texts.append(value.encode("utf-8", errors="surrogatepass"))
        record_skips(label, "invalid_json", bad_json, example)
        record_skips(label, "missing_field", missing, example)
        return np.array(texts, dtype=object).reshape([-1])

    def read(path):
        def to_texts(lines):
            texts = tf.py_function(parse, [lines], tf.string)
            texts.set_shape([None])
            return tf.data.Dataset.from_tensor_slices(texts)
        return (tf.data.TextLineDataset(path).batch(_CHECK_BATCH).flat_map(to_texts)
                .map(lambda text: {"text": text}))
    return seqio.FileDataSource(read_file_fn=read, split_to_filepattern=_split_files(patterns))


def tfrecord_files(*, patterns: Patterns, feature: str = "text",
                   compression_type: str | None = None) -> seqio.FileDataSource:
    """TFRecord files of tf.train.Example protos with a bytes `feature` (C4 dumps,
    seqio caches of raw text). A record without the feature reads as empty text
    and is counted as 'empty'."""
    spec = {feature: tf.io.FixedLenFeature([], tf.string, default_value="")}

    def read(path):
        records = tf.data.TFRecordDataset(path, compression_type=compression_type)
        return (records.batch(_CHECK_BATCH)
                .map(lambda protos: tf.io.parse_example(protos, spec)[feature])
                .unbatch().map(lambda text: {"text": text}))
    return seqio.FileDataSource(read_file_fn=read, split_to_filepattern=_split_files(patterns))


def tfds_dataset(*, name: str, data_dir: str | None = None,
                 splits: Iterable[str] | Mapping[str, str] = ("train", "validation")
                 ) -> seqio.TfdsDataSource:
    """A TFDS dataset by name ('c4/en:3.1.0'), read from `data_dir` (local or gs://).

    Its features are passed through; the task maps the text feature to 'text' (C4
    calls it 'text' already). Prepared data is required: nothing is downloaded.
    """
    return _TfdsSource(tfds_name=name, tfds_data_dir=data_dir, splits=splits,
                       read_only=True)


class _TfdsSource(seqio.TfdsDataSource):
    """seqio's TFDS source, tolerant of unknown split sizes.

    seqio asks for the split size only to decide on in-memory caching; a dataset
    whose metadata lacks sizes (e.g. under `tfds.testing.mock_data`) is then read
    uncached instead of failing.
    """

    def num_input_examples(self, split: str) -> int | None:
        try:
            return super().num_input_examples(split)
        except KeyError:
            return None
