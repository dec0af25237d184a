"""Vocabularies a run can choose in gin: the bundled SentencePiece model, any other
SentencePiece model, or raw bytes.

    from t5x_like.data import vocabularies
    user_tasks.register_text_task.vocabulary = @vocabularies.sentencepiece()
    vocabularies.sentencepiece.path = '/path/to/t5_32k/sentencepiece.model'

Every vocabulary reserves `extra_ids` ids at the top of its range: span corruption
takes its sentinels from there (vocab_size - 1 downward). Ids 0/1/2 are PAD/EOS/UNK
for all three (the bundled and the public T5 models are built that way; a model
with a different layout is refused, since the pipeline relies on PAD = 0, EOS = 1).
The model's vocab_size must be at least the vocabulary's `vocab_size` (T5 pads 32100
up to 32128 for speed).

The bundled model ships inside the package (`t5x_like/data/vocab/`, package data),
so the default works in an installed copy from any directory. In the repository that
folder is a link to `data/vocab/`, where `data/build_corpus.py` writes the model:
one file, byte-for-byte the one the build reproduces.
"""

from __future__ import annotations

import pathlib

import seqio
import tensorflow as tf

from t5x_like import errors

# Next to this module, in a checkout (through the link) and in an installed copy.
BUNDLED_SENTENCEPIECE = str(pathlib.Path(__file__).parent / "vocab" / "pydocs_8k.model")
DEFAULT_EXTRA_IDS = 100


def sentencepiece(*, path: str = BUNDLED_SENTENCEPIECE,
                  extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """A SentencePiece model from a local or gs:// path (default: the bundled 8k model).

    The file is checked now, not at the first batch, so a typo fails the run at
    start-up with the path in the message.
    """
    if not tf.io.gfile.exists(path):
        raise errors.InputNotFoundError(
            f"SentencePiece model not found: {path}",
            fix="correct vocabularies.sentencepiece.path (omit it for the bundled model)")
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    ids = (vocab.pad_id, vocab.eos_id, vocab.unk_id)
    if ids != (0, 1, 2):
        raise errors.ConfigError(
            f"SentencePiece model {path} has pad/eos/unk ids {ids}; this pipeline needs "
            "0/1/2", fix="train it with --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1")
    return vocab


def byte(*, extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.ByteVocabulary:
    """UTF-8 bytes (ByT5-style): ids 3..258 are the bytes, then `extra_ids` sentinels."""
    return seqio.ByteVocabulary(extra_ids=extra_ids)


def default() -> seqio.SentencePieceVocabulary:
    """The bundled 8k pydocs model with 100 sentinels: 8100 ids."""
    return sentencepiece()
