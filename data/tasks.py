"""seqio tasks over the bundled pydocs corpus. Importing this module registers them.

  pydocs_span_corruption   T5 span corruption; splits 'train' and 'validation';
                           features 'inputs'/'targets' over the 8k pydocs
                           SentencePiece vocabulary + 100 sentinel ids (8100 ids).

Paths are derived from this file, so the tasks work from any working directory.
Re-importing (or importlib.reload) replaces the registrations instead of failing.
"""

from __future__ import annotations

import pathlib

import seqio

from t5x_like import preprocessors

DATA_DIR = pathlib.Path(__file__).resolve().parent
VOCAB_PATH = DATA_DIR / "vocab" / "pydocs_8k.model"
SPLIT_FILES = {
    "train": DATA_DIR / "corpus" / "pydocs_train.txt",
    "validation": DATA_DIR / "corpus" / "pydocs_validation.txt",
}
EXTRA_IDS = 100  # sentinels for span corruption, at the top of the id range
# Chunks are shuffled after corruption; ~1000 examples mixes across many documents
# while keeping memory small.
SHUFFLE_BUFFER_SIZE = 1000


def _check_files() -> None:
    for path in (VOCAB_PATH, *SPLIT_FILES.values()):
        if not path.exists():
            raise FileNotFoundError(
                f"bundled data file is missing: {path}. Rebuild it from the repository "
                "root with `python -m data.build_corpus`.")


def pydocs_vocabulary() -> seqio.SentencePieceVocabulary:
    """The bundled 8000-piece vocabulary plus EXTRA_IDS sentinels (8100 ids)."""
    return seqio.SentencePieceVocabulary(str(VOCAB_PATH), extra_ids=EXTRA_IDS)


def _add_task(name: str, **kwargs) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **kwargs)


def register() -> None:
    """(Re-)registers every task of this module."""
    _check_files()
    vocab = pydocs_vocabulary()
    features = {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
    }
    _add_task(
        "pydocs_span_corruption",
        source=seqio.TextLineDataSource(
            {split: str(path) for split, path in SPLIT_FILES.items()}),
        preprocessors=[
            preprocessors.lines_to_examples,
            preprocessors.drop_empty_text,
            preprocessors.tokenize,  # 'text' -> 'targets' token ids
            seqio.CacheDatasetPlaceholder(),
            # Runs after seqio's repeat: new masks and chunk boundaries every epoch.
            preprocessors.span_corruption,
        ],
        output_features=features,
        metric_fns=[],
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )


register()
