"""Builds the bundled English corpus and its SentencePiece vocabulary.

Run from the repository root:  .venv/bin/python -m data.build_corpus

Why this corpus: tests and CPU smoke runs need real text that ships with the repo,
builds offline, and may be redistributed. The Python standard library documents
itself (PSF licence): the reference-manual topics in ``pydoc_data/topics.py`` plus
the docstrings of its modules, classes and functions. We read docstrings with
``ast`` so no stdlib module is ever imported (importing some of them has side
effects, e.g. ``antigravity`` opens a browser).

Outputs (all deterministic for a given Python installation):
  data/corpus/pydocs_train.txt        one document per line
  data/corpus/pydocs_validation.txt   ~2% held out by a stable hash of the text
  data/vocab/pydocs_8k.model/.vocab   SentencePiece unigram, 8000 pieces (the package
                                      ships this file: t5x_like/data/vocab links here)
  data/corpus/SOURCE.md, LICENSE      provenance and the PSF licence text
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
from typing import Iterable, Iterator

import sentencepiece as spm

DATA_DIR = pathlib.Path(__file__).resolve().parent
CORPUS_DIR = DATA_DIR / "corpus"
VOCAB_DIR = DATA_DIR / "vocab"
TRAIN_FILE = CORPUS_DIR / "pydocs_train.txt"
VALIDATION_FILE = CORPUS_DIR / "pydocs_validation.txt"
VOCAB_PREFIX = VOCAB_DIR / "pydocs_8k"

MIN_DOC_CHARS = 80
# A document goes to validation when its hash falls in 1 of VALIDATION_MODULUS buckets.
VALIDATION_MODULUS = 50
VOCAB_SIZE = 8000
# SentencePiece skips training sentences longer than this many bytes, so longer
# documents are cut into pieces at whitespace for vocabulary training only.
SPM_MAX_SENTENCE_BYTES = 16384

# Directory names never walked: test suites (mostly code and fixtures, not prose),
# third-party packages, build artefacts and vendored wheels.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "lib-dynload", "_bundled",
})


def normalize(text: str) -> str:
    """Collapses every whitespace run (newlines included) to one space."""
    return " ".join(text.split())


def _topic_documents(stdlib: pathlib.Path) -> Iterator[str]:
    """Yields the reference-manual topics in sorted key order (parsed, not imported)."""
    tree = ast.parse((stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield topics[key]
            return
    raise RuntimeError("pydoc_data/topics.py has no `topics = {...}` assignment")


def _stdlib_sources(stdlib: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields stdlib .py files in a sorted, platform-independent walk order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs
                         if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                yield pathlib.Path(root) / name


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(path: pathlib.Path) -> Iterator[str]:
    """Yields module/class/function docstrings of one file, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. lib2to3 grammar fixtures in Python 2
        return
    stack: list[ast.AST] = [tree]
    while stack:  # depth-first, pre-order: deterministic and close to reading order
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def collect_documents(stdlib: pathlib.Path) -> tuple[list[str], dict[str, int]]:
    """Returns normalised, de-duplicated documents in build order plus counts."""
    def raw() -> Iterator[tuple[str, str]]:
        for text in _topic_documents(stdlib):
            yield "topics", text
        for path in _stdlib_sources(stdlib):
            for text in _docstrings(path):
                yield "docstrings", text

    seen: set[str] = set()
    docs: list[str] = []
    counts = {"topics": 0, "docstrings": 0, "too_short": 0, "duplicates": 0}
    for source, text in raw():
        text = normalize(text)
        if len(text) < MIN_DOC_CHARS:
            counts["too_short"] += 1
        elif text in seen:
            counts["duplicates"] += 1
        else:
            seen.add(text)
            docs.append(text)
            counts[source] += 1
    return docs, counts


def is_validation(doc: str) -> bool:
    """Stable split: depends only on the text, not on order or on PYTHONHASHSEED."""
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % VALIDATION_MODULUS == 0


def _training_sentences(docs: Iterable[str]) -> Iterator[str]:
    """Cuts documents into pieces SentencePiece accepts (at spaces, by byte length)."""
    for doc in docs:
        words, size = [], 0
        for word in doc.split(" "):
            n = len(word.encode("utf-8")) + 1
            if words and size + n > SPM_MAX_SENTENCE_BYTES:
                yield " ".join(words)
                words, size = [], 0
            words.append(word)
            size += n
        if words:
            yield " ".join(words)


def train_vocab(train_docs: list[str], model_prefix: pathlib.Path) -> None:
    """Trains a deterministic unigram model with seqio/T5 special ids.

    Determinism: one thread, every sentence used (input_sentence_size=0), no shuffling,
    so the same text gives a byte-identical model.
    """
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(train_docs),
        model_prefix=str(model_prefix),
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=0.9999,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=SPM_MAX_SENTENCE_BYTES,
        minloglevel=2,
    )


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_lines(path: pathlib.Path, docs: list[str]) -> None:
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")


def _source_md(stdlib: pathlib.Path, counts: dict[str, int], n_train: int,
               n_val: int) -> str:
    outputs = [TRAIN_FILE, VALIDATION_FILE, VOCAB_PREFIX.with_suffix(".model"),
               VOCAB_PREFIX.with_suffix(".vocab")]
    rows = "\n".join(
        f"| `{p.relative_to(DATA_DIR.parent)}` | {p.stat().st_size:,} | `{_sha256(p)}` |"
        for p in outputs)
    return f"""# pydocs corpus: provenance

**What.** English prose from the Python standard library's own documentation:
the reference-manual topics shipped as `pydoc_data/topics.py` ({counts['topics']} documents)
and the docstrings of stdlib modules, classes and functions ({counts['docstrings']} documents).
The text is © Python Software Foundation, distributed under the PSF licence
(see `LICENSE`, copied from the interpreter's `LICENSE.txt`).

**From.** CPython {platform.python_version()} ({sys.implementation.cache_tag}),
stdlib at `{stdlib}` on {platform.system()} {platform.machine()}.
A different Python version yields different text; rerun the build to regenerate.

**How.** `.venv/bin/python -m data.build_corpus` (see `data/build_corpus.py`):
1. topics in sorted key order, then every `.py` file of the stdlib walked in sorted
   order, skipping directories {sorted(_SKIP_DIRS)} and `config-*`, and files named
   `test_*.py`; docstrings read with `ast` (no module is imported), pre-order.
2. whitespace runs collapsed to a single space; documents shorter than {MIN_DOC_CHARS}
   characters dropped ({counts['too_short']}); exact duplicates dropped ({counts['duplicates']}).
3. one document per line; a document is held out for validation when the first
   8 bytes of its SHA-256 (big-endian) are 0 mod {VALIDATION_MODULUS} (~2%).
4. SentencePiece {spm.__version__} unigram model on the train file: vocab_size {VOCAB_SIZE},
   pad=0 eos=1 unk=2 no bos, character_coverage 0.9999, one thread, no sampling or
   shuffling (rerunning gives a byte-identical model). Documents longer than
   {SPM_MAX_SENTENCE_BYTES} bytes are cut at spaces for vocabulary training only.
   seqio adds 100 sentinel ids on top (`extra_ids=100`), for {VOCAB_SIZE + 100} ids in all.

**Counts.** train: {n_train} documents; validation: {n_val} documents.

| file | bytes | sha256 |
|---|---|---|
{rows}
"""


def build(stdlib: pathlib.Path) -> dict[str, str]:
    """Builds every output; returns {{relative path: sha256}}."""
    docs, counts = collect_documents(stdlib)
    train = [d for d in docs if not is_validation(d)]
    validation = [d for d in docs if is_validation(d)]
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    _write_lines(TRAIN_FILE, train)
    _write_lines(VALIDATION_FILE, validation)
    train_vocab(train, VOCAB_PREFIX)
    shutil.copyfile(stdlib / "LICENSE.txt", CORPUS_DIR / "LICENSE")
    (CORPUS_DIR / "SOURCE.md").write_text(
        _source_md(stdlib, counts, len(train), len(validation)), encoding="utf-8")
    outputs = [TRAIN_FILE, VALIDATION_FILE, VOCAB_PREFIX.with_suffix(".model"),
               VOCAB_PREFIX.with_suffix(".vocab")]
    return {str(p.relative_to(DATA_DIR.parent)): _sha256(p) for p in outputs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=pathlib.Path,
                        default=pathlib.Path(sysconfig.get_paths()["stdlib"]),
                        help="standard library directory to read")
    args = parser.parse_args(argv)
    for path, digest in build(args.stdlib).items():
        print(f"{digest}  {path}")


if __name__ == "__main__":
    main()
