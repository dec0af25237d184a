"""Builds the second bundled fine-tuning task: a paragraph of the Python docs -> the
first code name it quotes.

Run from the repository root:  .venv/bin/python -m data.build_code_names

Why this task: the multi-task demo (`pydocs_finetune_mixture`, data/tasks.py) needs a
second supervised task that ships with the repository, builds offline, may be
redistributed, and that is within a small model's reach: its answer is in the input
(a section title must be recalled). The
Python reference manual quotes code in double quotes ('The built-in variable
"__debug__" is "True" ...'; prose uses curly quotes), so "which code name does this
passage mention first?" has one checkable answer, found in the input itself: the
model must learn where to look and copy, not recall. The answer keeps its quotes,
so it is tokenized as in the paragraph (`▁"` `assert` `"`), token for token in 3 of 4
examples (in the rest the closing quote merges with punctuation: `AttributeError` `").`).

Inputs are the two corpus files only, so the output is the same byte for byte on
any machine; `tests/test_code_names_task.py` rebuilds it and compares it with the
shipped files. Paragraphs are cut as for section titles
(`build_section_titles.paragraphs`) and split the same way (`is_validation`).

Outputs:
  data/code_names/train.tsv, validation.tsv   paragraph <TAB> "name", one per line
  data/code_names/SOURCE.md                   provenance, counts, hashes, licence
"""

from __future__ import annotations

import pathlib
import re

from data.build_section_titles import (CORPUS_FILES, DATA_DIR, paragraphs, run,
                                      sha256_of, write_task)

OUTPUT_DIR = DATA_DIR / "code_names"
SPLITS = ("train", "validation")

# A quoted code name: an identifier or dotted name, optionally called ('"str.format()"'),
# with its opening quote at the start of a word.
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\(\))?"
_QUOTED_NAME = re.compile(rf'(?:(?<=[ (])|^)"{_NAME}"')


def first_code_name(paragraph: str) -> str | None:
    """The first double-quoted code name of a paragraph, quotes included, or None."""
    match = _QUOTED_NAME.search(paragraph)
    return match.group(0) if match else None


def examples(documents: list[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(paragraph, "name") pairs in corpus order; a repeated paragraph is kept once."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    counts = {"paragraphs": 0, "duplicates": 0, "without_name": 0}
    for document in documents:
        for paragraph in paragraphs(document):
            counts["paragraphs"] += 1
            if paragraph in seen:
                counts["duplicates"] += 1
                continue
            seen.add(paragraph)
            name = first_code_name(paragraph)
            if name is None:
                counts["without_name"] += 1
                continue
            pairs.append((paragraph, name))
    counts["names"] = len({name for _, name in pairs})
    return pairs, counts


def _source_md(counts: dict[str, int], sizes: dict[str, int],
               output_dir: pathlib.Path) -> str:
    inputs = "\n".join(f"| `{p.relative_to(DATA_DIR.parent)}` | {p.stat().st_size:,} | "
                       f"`{sha256_of(p)}` |" for p in CORPUS_FILES)
    outputs = "\n".join(f"| `{split}.tsv` | {sizes[split]:,} | "
                        f"`{sha256_of(output_dir / f'{split}.tsv')}` |" for split in SPLITS)
    return f"""# pydocs code names: a fine-tuning task

**What.** Supervised text-to-text examples: a paragraph of the Python documentation
(input) and the first code name it quotes, with its quotes (target), e.g.
`"__debug__"` for 'The built-in variable "__debug__" is "True" under normal
circumstances ...'. {counts['train']} training and {counts['validation']} validation examples,
{counts['names']} distinct names. Registered as the seqio task `pydocs_code_names`
(`data/tasks.py`), scored with exact match and ROUGE-L; with `pydocs_section_titles`
it forms the mixture `pydocs_finetune_mixture`. The task puts `code name: ` before
each paragraph (the files hold the bare text): the two tasks share many paragraphs,
and in the mixture the prefix says which answer is asked for.

**Why this task.** The answer is in the input: the model has to learn where to look
(the first `"` that opens a name) and copy, where a section title must be recalled.
The target keeps its quotes so it is tokenized as in the paragraph: its tokens
appear as such in the input in 3 of 4 examples (elsewhere the closing quote merges
with punctuation). Not yet learned in a short CPU run: `configs/finetune_mixture.gin`
(300 steps) from a base run of only 100 steps reached 1.9% greedy exact match (2 of
104; 5.8% at step 200, frequent names guessed rather than copied), so the copying
needs a longer-pretrained base or more steps.

**Licence.** The text is © Python Software Foundation, from the bundled pydocs
corpus, distributed under the PSF licence: see `data/corpus/LICENSE` and
`data/corpus/SOURCE.md`.

**How.** `.venv/bin/python -m data.build_code_names` (see `data/build_code_names.py`);
it reads only the two corpus files below, so it rebuilds byte for byte anywhere:
1. Every corpus document (train file, then validation file, in line order) is cut
   into paragraphs of whole sentences as for section titles
   (`data/build_section_titles.py`: up to 80 words, a last piece under 15 words
   dropped). {counts['paragraphs']} paragraphs; repeated ones kept once ({counts['duplicates']} dropped).
2. The target is the first double-quoted code name: `"` at the start of a word, an
   identifier or dotted name, optionally followed by `()`, then `"`. Paragraphs
   without one are dropped ({counts['without_name']}); most are docstrings, which
   quote code in other ways.
3. An example goes to validation when the first 8 bytes of its paragraph's SHA-256
   (big-endian) are 0 mod 10 (~10%), the section-titles rule: validation paragraphs
   are unseen in training. The paragraphs are also part of the pretraining corpus
   (as unlabelled text).
4. One example per line: paragraph, a tab, name (the text holds no tabs or newlines).

**Inputs.**

| file | bytes | sha256 |
|---|---|---|
{inputs}

**Outputs** (in `data/code_names/`).

| file | bytes | sha256 |
|---|---|---|
{outputs}
"""


def build(output_dir: pathlib.Path = OUTPUT_DIR) -> dict[str, str]:
    """Writes the two TSV files and SOURCE.md; returns {file name: sha256}."""
    return write_task(examples, _source_md, output_dir)


def main(argv: list[str] | None = None) -> None:
    run(build, __doc__.splitlines()[0], OUTPUT_DIR, argv)


if __name__ == "__main__":
    main()
