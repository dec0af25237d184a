"""Builds the third bundled fine-tuning task: a docs paragraph with a word blanked -> the word.

Run from the repository root:  .venv/bin/python -m data.build_missing_word

Why this task: the fine-tuning demo must show pretraining paying off in a decoded
metric, at equal steps, on 2 CPU cores. The two other bundled tasks do not show it
with the default 300-step base (benchmarks/RESULTS.md): section titles repeat
between training and validation, so a model trained from scratch learns them too;
code names need copying, which that base never learned. Filling a blank is what
span corruption pretraining teaches (a masked span -> its text), so a pretrained
model should carry its knowledge over, while a model from scratch has only the
fine-tuning examples to learn English and Python from.

Validation is the corpus's held-out file (data/corpus/pydocs_validation.txt), which
pretraining (pydocs_span_corruption, 'train' split) never saw, so no validation
paragraph was read in pretraining or fine-tuning; training examples come from the
train file only. The blanked words are chosen by SHA-256, so the output is the same
byte for byte on any machine; `tests/test_missing_word_task.py` rebuilds it and
compares it with the shipped files.

Outputs:
  data/missing_word/train.tsv, validation.tsv   paragraph with BLANK <TAB> word
  data/missing_word/SOURCE.md                   provenance, counts, hashes, licence
"""

from __future__ import annotations

import collections
import hashlib
import pathlib
import re

from data.build_section_titles import (CORPUS_FILES, DATA_DIR, SPLITS, corpus_documents,
                                      paragraphs, run, sha256_of, write_splits)

OUTPUT_DIR = DATA_DIR / "missing_word"
# The blank is the vocabulary's first sentinel, the token span corruption puts where
# it removed text: the task asks what pretraining practised, in its own notation (T5
# writes its fill-in-the-blank tasks so). With a plain '___' the default base filled
# no more blanks than guessing 'the' (benchmarks/RESULTS.md, "Missing word").
BLANK = "<extra_id_0>"
# A word that may be blanked: a whole space-separated word of ASCII letters (no
# digits, underscores or attached punctuation). Every such word, short ones included:
# with only words of 4+ letters (MIN_LETTERS = 4) the default 300-step base filled
# no more blanks than a model from scratch (benchmarks/RESULTS.md, "Missing word"):
# it has learned the docs' short words and grammar, not their content words yet.
MIN_LETTERS = 1
_BLANKABLE = re.compile(rf"[A-Za-z]{{{MIN_LETTERS},}}")
# Blanks per paragraph. The validation file holds only ~130 usable paragraphs, so
# each gives several examples (at most one per word); the train file is ~47x larger.
BLANKS_PER_PARAGRAPH = {"train": 1, "validation": 4}
# Half the train file's paragraphs (SHA-256 of the paragraph, first 8 bytes
# big-endian, even) keep train.tsv under 1 MB; 300 steps see each ~4 times.
TRAIN_MODULUS = 2


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def blanks(paragraph: str, count: int) -> list[tuple[str, str]]:
    """Up to `count` (paragraph with one word replaced by BLANK, that word) pairs, in
    word order. The words are the blankable ones whose SHA-256 of '<index> <paragraph>'
    is smallest: a fixed pseudo-random choice."""
    words = paragraph.split(" ")
    candidates = [i for i, word in enumerate(words) if _BLANKABLE.fullmatch(word)]
    chosen = sorted(sorted(candidates, key=lambda i: _digest(f"{i} {paragraph}"))[:count])
    return [(" ".join([*words[:i], BLANK, *words[i + 1:]]), words[i]) for i in chosen]


def unique_paragraphs(documents: list[str]) -> list[str]:
    """The paragraphs of the documents (cut as for section titles), each kept once."""
    return list(dict.fromkeys(p for document in documents for p in paragraphs(document)))


def examples() -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """{split: [(blanked paragraph, word)]} from the two corpus files, and counts."""
    train_file, validation_file = (unique_paragraphs(corpus_documents(path))
                                   for path in CORPUS_FILES)
    counts = {"train_paragraphs": len(train_file),
              "validation_paragraphs": len(validation_file)}
    # Text that already holds the blank marker would be ambiguous (none does).
    train_file = [p for p in train_file if BLANK not in p]
    seen_in_train = set(train_file)
    validation_file = [p for p in validation_file if p not in seen_in_train]
    counts["validation_also_in_train"] = counts["validation_paragraphs"] - len(validation_file)
    train_file = [p for p in train_file if _digest(p) % TRAIN_MODULUS == 0]
    rows = {}
    for split, chosen in zip(SPLITS, (train_file, validation_file)):
        rows[split] = [pair for p in chosen
                       for pair in blanks(p, BLANKS_PER_PARAGRAPH[split])]
        counts[f"{split}_used"] = len({p for p in chosen if blanks(p, 1)})
    answers = collections.Counter(word for _, word in rows["validation"])
    counts["validation_words"] = len(answers)
    counts["top_word"], counts["top_count"] = answers.most_common(1)[0]
    train_words = {word for _, word in rows["train"]}
    counts["validation_words_in_train"] = sum(
        n for word, n in answers.items() if word in train_words)
    return rows, counts


def _source_md(counts: dict, sizes: dict[str, int], output_dir: pathlib.Path) -> str:
    inputs = "\n".join(f"| `{p.relative_to(DATA_DIR.parent)}` | {p.stat().st_size:,} | "
                       f"`{sha256_of(p)}` |" for p in CORPUS_FILES)
    outputs = "\n".join(f"| `{split}.tsv` | {sizes[split]:,} | "
                        f"`{sha256_of(output_dir / f'{split}.tsv')}` |" for split in SPLITS)
    top_share = 100 * counts["top_count"] / counts["validation"]
    in_train = 100 * counts["validation_words_in_train"] / counts["validation"]
    return f"""# pydocs missing word: a fine-tuning task

**What.** Supervised text-to-text examples: a paragraph of the Python documentation
with one word replaced by `{BLANK}` (input) and that word (target), e.g. `... A
function definition {BLANK} a user-defined function object ...` -> `defines`.
{counts['train']} training and {counts['validation']} validation examples. Registered as the seqio task
`pydocs_missing_word` (`data/tasks.py`), which puts `missing word: ` before each
input (the files hold the bare text), scored with exact match and ROUGE-L on the
decoded word.

**Why this task.** It shows whether pretraining pays off in a decoded metric.
Filling a blank is what span corruption pretraining teaches, so a pretrained model
brings what it learned of the docs' language; a model trained from scratch has only
the fine-tuning examples. The two other bundled tasks do not separate the two starts
in exact match with the default 300-step base, and nor does this one yet: eval loss
separates them, greedy exact match stays at the floor below for both, full
fine-tuning and LoRA (benchmarks/RESULTS.md, "Missing word").
- **Validation text is unseen**: validation examples come from the corpus's
  validation file, which pretraining (`pydocs_span_corruption`, 'train' split) never
  reads; its paragraphs that also occur in the train file are dropped
  ({counts['validation_also_in_train']}). Training examples come from the train file only.
- **Which words**: every whole word of ASCII letters (no digits, underscores or
  attached punctuation), short ones included. The most frequent validation answer is
  `{counts['top_word']}`, {counts['top_count']} of {counts['validation']} ({top_share:.1f}%):
  roughly what a model that learned only the answers' frequencies scores, so exact
  match is read against that floor. A first version blanked only words of 4+ letters
  (floor 1.6%): there the default 300-step base filled no more blanks than a model
  from scratch (1.2-2.2% exact match, benchmarks/RESULTS.md), having learned the
  docs' short words and grammar but not yet their content words. {counts['validation_words']}
  distinct validation answers; {in_train:.1f}% of the validation examples have an
  answer that is also a training answer.
- **The blank is `{BLANK}`**, the vocabulary's first sentinel: the token span
  corruption puts where it removed text, so the task asks what pretraining
  practised, in its notation (T5 writes fill-in-the-blank tasks so). To a model
  from scratch it is one more input token. With a plain `___` marker the default
  base's fine-tuned model answered no better than guessing `the` (7.4% exact
  match at steps 100-300, benchmarks/RESULTS.md).
- **Fair to both starts**: the answer is one word, decoded greedily and compared
  exactly (case included), so exact match is a plain count of blanks filled right.

**Licence.** The text is © Python Software Foundation, from the bundled pydocs
corpus, distributed under the PSF licence: see `data/corpus/LICENSE` and
`data/corpus/SOURCE.md`.

**How.** `.venv/bin/python -m data.build_missing_word` (see
`data/build_missing_word.py`); it reads only the two corpus files below, so it
rebuilds byte for byte anywhere:
1. Each corpus file's documents (in line order) are cut into paragraphs of whole
   sentences as for section titles (`data/build_section_titles.py`: up to 80 words,
   a last piece under 15 words dropped); a repeated paragraph is kept once. Train
   file: {counts['train_paragraphs']} paragraphs; validation file:
   {counts['validation_paragraphs']}.
2. Validation paragraphs found in the train file are dropped (and any paragraph
   holding `{BLANK}`: none does).
3. Train: the paragraphs whose SHA-256 (first 8 bytes, big-endian) is 0 mod
   {TRAIN_MODULUS} ({counts['train_used']}, keeping `train.tsv` under 1 MB), one blank
   each. Validation: every paragraph ({counts['validation_used']}), up to
   {BLANKS_PER_PARAGRAPH['validation']} blanks each (the file is ~47x smaller).
4. The blanked words of a paragraph are its blankable words whose SHA-256 of
   `<word index> <paragraph>` is smallest; one example per blank, in word order.
   Putting the target back in place of `{BLANK}` gives the corpus paragraph.
5. One example per line: blanked paragraph, a tab, word.

**Inputs.**

| file | bytes | sha256 |
|---|---|---|
{inputs}

**Outputs** (in `data/missing_word/`).

| file | bytes | sha256 |
|---|---|---|
{outputs}
"""


def build(output_dir: pathlib.Path = OUTPUT_DIR) -> dict[str, str]:
    """Writes the two TSV files and SOURCE.md; returns {file name: sha256}."""
    rows, counts = examples()
    return write_splits(rows, counts, _source_md, output_dir)


def main(argv: list[str] | None = None) -> None:
    run(build, __doc__.splitlines()[0], OUTPUT_DIR, argv)


if __name__ == "__main__":
    main()
