"""Builds the bundled fine-tuning task: a paragraph of the Python docs -> its section title.

Run from the repository root:  .venv/bin/python -m data.build_section_titles

Why this task: fine-tuning needs a supervised text-to-text task that ships with the
repository, builds offline, may be redistributed, and has answers a metric can check
(exact match, ROUGE-L). The bundled pretraining corpus (`data/corpus/`, the Python
standard library's documentation, PSF licence) keeps the reStructuredText section
titles of the reference manual: after whitespace was collapsed, a title is still
followed by its underline, a run of one punctuation character exactly as long as the
title ('Function definitions ******************** A function definition ...'). Each
section's text is cut into paragraphs of whole sentences, and each paragraph becomes
one example whose target is the title of its section.

Input is the two corpus files only (not the Python installation), so the output is
the same byte for byte on any machine; `tests/test_section_titles_task.py` rebuilds
it and compares hashes with data/section_titles/SOURCE.md.

Outputs:
  data/section_titles/train.tsv, validation.tsv   paragraph <TAB> title, one per line
  data/section_titles/SOURCE.md                   provenance, counts, hashes, licence
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
from collections.abc import Iterator

DATA_DIR = pathlib.Path(__file__).resolve().parent
CORPUS_FILES = (DATA_DIR / "corpus" / "pydocs_train.txt",
                DATA_DIR / "corpus" / "pydocs_validation.txt")
OUTPUT_DIR = DATA_DIR / "section_titles"
SPLITS = ("train", "validation")

# A title underline: 4+ of one RST adornment character, standing alone as a word.
_UNDERLINE = re.compile(r'(?:(?<= )|^)([*=\-~^"])\1{3,}(?= |$)')
_ADORNMENT_RUN = re.compile(r'([*=\-~^"])\1{2,}')
MAX_TITLE_CHARS = 60
# Paragraphs: whole sentences, greedily up to MAX_WORDS (a longer sentence, e.g. a
# grammar rule, is cut at MAX_WORDS); a last piece shorter than MIN_WORDS is dropped.
MIN_WORDS, MAX_WORDS = 15, 80
_SENTENCE_END = re.compile(r'(?<=[.!?]) (?=[A-Z0-9"(*])')
# An example is held out for validation when its paragraph's SHA-256 (first 8 bytes,
# big-endian) is 0 modulo this: ~10%, stable under any reordering.
VALIDATION_MODULUS = 10


def sections(document: str) -> Iterator[tuple[str, str]]:
    """(title, text up to the next title) for every underlined title in a document."""
    found = []  # (title start, body start, title)
    for match in _UNDERLINE.finditer(document):
        width = len(match.group(0))
        before = document[:match.start()].rstrip(" ")
        title, preceding = before[-width:], before[:-width]
        if len(before) < width or (preceding and not preceding.endswith(" ")):
            continue     # the text before the run is not exactly one title long
        if (not re.search(r"[A-Za-z]", title) or "|" in title
                or len(title) > MAX_TITLE_CHARS or _ADORNMENT_RUN.search(title)):
            continue     # a table rule or a separator, not a title
        found.append((len(preceding), match.end(), title.strip()))
    for i, (_, body_start, title) in enumerate(found):
        body_end = found[i + 1][0] if i + 1 < len(found) else len(document)
        yield title, document[body_start:body_end].strip()


def paragraphs(text: str) -> Iterator[str]:
    """Whole sentences grouped into paragraphs of MIN_WORDS..MAX_WORDS words."""
    words: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence_words = sentence.split()
        if words and len(words) + len(sentence_words) > MAX_WORDS:
            yield " ".join(words)
            words = []
        words.extend(sentence_words)
        while len(words) > MAX_WORDS:
            yield " ".join(words[:MAX_WORDS])
            words = words[MAX_WORDS:]
    if len(words) >= MIN_WORDS:
        yield " ".join(words)


def is_validation(paragraph: str) -> bool:
    digest = hashlib.sha256(paragraph.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % VALIDATION_MODULUS == 0


def examples(documents: list[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(paragraph, title) pairs in corpus order, without duplicates or ambiguities.

    The reference manual repeats some sections under several topics: a repeated
    (paragraph, title) pair is kept once; a paragraph found under two different
    titles has no single answer and is dropped.
    """
    titles_of: dict[str, set[str]] = {}
    order: list[tuple[str, str]] = []
    counts = {"sections": 0, "duplicates": 0, "ambiguous": 0}
    for document in documents:
        for title, text in sections(document):
            counts["sections"] += 1
            for paragraph in paragraphs(text):
                seen = titles_of.setdefault(paragraph, set())
                if title in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(title)
                order.append((paragraph, title))
    kept = [(p, t) for p, t in order if len(titles_of[p]) == 1]
    counts["ambiguous"] = len(order) - len(kept)
    counts["titles"] = len({t for _, t in kept})
    return kept, counts


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_md(counts: dict[str, int], sizes: dict[str, int],
               output_dir: pathlib.Path) -> str:
    inputs = "\n".join(f"| `{p.relative_to(DATA_DIR.parent)}` | {p.stat().st_size:,} | "
                       f"`{sha256_of(p)}` |" for p in CORPUS_FILES)
    outputs = "\n".join(f"| `{split}.tsv` | {sizes[split]:,} | "
                        f"`{sha256_of(output_dir / f'{split}.tsv')}` |" for split in SPLITS)
    return f"""# pydocs section titles: a fine-tuning task

**What.** Supervised text-to-text examples: a paragraph of the Python reference
manual (input) and the title of the section it comes from (target), e.g.
`The "del" statement`. {counts['train']} training and {counts['validation']} validation examples,
{counts['titles']} distinct titles. Registered as the seqio task `pydocs_section_titles`
(`data/tasks.py`), scored with exact match and ROUGE-L.

**Licence.** The text is © Python Software Foundation, from the bundled pydocs
corpus, distributed under the PSF licence: see `data/corpus/LICENSE` and
`data/corpus/SOURCE.md`.

**How.** `.venv/bin/python -m data.build_section_titles` (see
`data/build_section_titles.py`); it reads only the two corpus files below, so it
rebuilds byte for byte anywhere:
1. In every corpus document (train file, then validation file, in line order), a
   section title is the text right before its reStructuredText underline: a run of
   4+ of one of `*=-~^"` exactly as long as the title. Runs inside tables, titles
   longer than {MAX_TITLE_CHARS} characters or without a letter are ignored. A section's
   text runs to the next title. {counts['sections']} sections.
2. Each section's text is cut into paragraphs of whole sentences, greedily up to
   {MAX_WORDS} words (a longer sentence is cut at {MAX_WORDS} words); a last piece under
   {MIN_WORDS} words is dropped.
3. Repeated (paragraph, title) pairs are kept once ({counts['duplicates']} dropped); a paragraph
   found under two different titles is dropped ({counts['ambiguous']}).
4. An example goes to validation when the first 8 bytes of its paragraph's SHA-256
   (big-endian) are 0 mod {VALIDATION_MODULUS} (~10%). Validation paragraphs are unseen in
   training, but most of their titles are not: the task measures recognising what a
   passage is about, in the manual's own words. The paragraphs are also part of the
   pretraining corpus (as unlabelled text).
5. One example per line: paragraph, a tab, title (the text holds no tabs or newlines).

**Inputs.**

| file | bytes | sha256 |
|---|---|---|
{inputs}

**Outputs** (in `data/section_titles/`).

| file | bytes | sha256 |
|---|---|---|
{outputs}
"""


def corpus_documents(path: pathlib.Path) -> list[str]:
    """The documents of one corpus file, one per line, in file order."""
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]


def write_task(examples_of, source_md, output_dir: pathlib.Path) -> dict[str, str]:
    """Builds a text-to-text task from the bundled corpus: `examples_of(documents)`
    -> (pairs, counts); writes train.tsv, validation.tsv (split by `is_validation`)
    and `source_md(counts, sizes, output_dir)` as SOURCE.md; returns {file: sha256}.
    Shared with data/build_code_names.py."""
    documents = [document for path in CORPUS_FILES for document in corpus_documents(path)]
    pairs, counts = examples_of(documents)
    rows = {split: [(p, t) for p, t in pairs if is_validation(p) == (split == "validation")]
            for split in SPLITS}
    return write_splits(rows, counts, source_md, output_dir)


def write_splits(rows: dict[str, list[tuple[str, str]]], counts: dict[str, int],
                 source_md, output_dir: pathlib.Path) -> dict[str, str]:
    """Writes {split: [(input, target)]} as SPLITS' TSV files (counting each split's
    rows into `counts`) and `source_md(counts, sizes, output_dir)` as SOURCE.md;
    returns {file: sha256}. data/build_missing_word.py calls it directly, since its
    splits follow the corpus files rather than `is_validation`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in SPLITS:
        counts[split] = len(rows[split])
        path = output_dir / f"{split}.tsv"
        path.write_bytes("".join(f"{p}\t{t}\n" for p, t in rows[split]).encode("utf-8"))
        sizes[split] = path.stat().st_size
    (output_dir / "SOURCE.md").write_bytes(
        source_md(counts, sizes, output_dir).encode("utf-8"))
    return {name: sha256_of(output_dir / name)
            for name in (*(f"{s}.tsv" for s in SPLITS), "SOURCE.md")}


def build(output_dir: pathlib.Path = OUTPUT_DIR) -> dict[str, str]:
    """Writes the two TSV files and SOURCE.md; returns {file name: sha256}."""
    return write_task(examples, _source_md, output_dir)


def run(build_fn, description: str, default_output: pathlib.Path,
        argv: list[str] | None = None) -> None:
    """The command line of a task build script: --output_dir, then the digests."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", type=pathlib.Path, default=default_output)
    args = parser.parse_args(argv)
    for name, digest in build_fn(args.output_dir).items():
        print(f"{digest}  {name}")


def main(argv: list[str] | None = None) -> None:
    run(build, __doc__.splitlines()[0], OUTPUT_DIR, argv)


if __name__ == "__main__":
    main()
