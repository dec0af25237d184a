"""seqio tasks over the bundled pydocs corpus. Importing this module registers them.

All use the 8k pydocs SentencePiece vocabulary + 100 sentinel ids (8100 ids) and
splits 'train' and 'validation':

  pydocs_span_corruption  T5 span corruption; 'inputs'/'targets'; feature converter
                          'enc_dec'.
  pydocs_lm               causal LM; 'targets'; feature converter 'lm'.
  pydocs_prefix_lm        prefix LM; 'inputs' (prefix) / 'targets' (suffix); feature
                          converter 'prefix_lm' (decoder-only) or 'enc_dec'.
  pydocs_mixture          3:1 span corruption : prefix LM. Both emit inputs/targets
                          over the same vocabulary, so the mixture works with the
                          'enc_dec' converter (T5's two pretraining objectives) and
                          with 'prefix_lm' (UL2-style, for a decoder-only model).
  pydocs_section_titles   fine-tuning: a paragraph of the reference manual ('inputs')
                          -> the title of its section ('targets'); scored with exact
                          match and ROUGE-L (data/section_titles/SOURCE.md).
  pydocs_code_names       fine-tuning: 'code name: ' + a paragraph of the Python docs
                          ('inputs') -> the first code name it quotes, quotes included,
                          e.g. '"__debug__"' ('targets'); exact match and ROUGE-L
                          (data/code_names/SOURCE.md). The prefix names the task: the
                          two tasks share ~380 paragraphs, which without it would be
                          one input with two answers in the mixture.
  pydocs_missing_word     fine-tuning: 'missing word: ' + a paragraph of the Python docs
                          with one word replaced by the sentinel '<extra_id_0>'
                          ('inputs') ->
                          that word ('targets'); exact match and ROUGE-L
                          (data/missing_word/SOURCE.md). Validation paragraphs come from
                          the corpus's validation file, unseen in pretraining, so
                          a pretrained start can show in the decoded metric.
  pydocs_finetune_mixture multi-task fine-tuning: section titles and code names at
                          rates 1:1 (FINETUNE_MIXTURE_RATES; the two have ~800 training
                          examples each), 'enc_dec' converter. Training samples the
                          tasks by rate; in-loop eval and launch.eval score each task
                          on its own validation split, under its own name.

The tasks are built with `t5x_like.data.user_tasks`, the same calls users make for
their own data. Paths are derived from this file, so they work from any working directory;
re-importing (or importlib.reload) replaces the registrations instead of failing.
"""

from __future__ import annotations

import pathlib

import seqio

from t5x_like.data import text_to_text, user_tasks, vocabularies

DATA_DIR = pathlib.Path(__file__).resolve().parent
VOCAB_PATH = DATA_DIR / "vocab" / "pydocs_8k.model"
SPLIT_FILES = {
    "train": DATA_DIR / "corpus" / "pydocs_train.txt",
    "validation": DATA_DIR / "corpus" / "pydocs_validation.txt",
}
SECTION_TITLES_FILES = {
    "train": DATA_DIR / "section_titles" / "train.tsv",
    "validation": DATA_DIR / "section_titles" / "validation.tsv",
}
CODE_NAMES_FILES = {
    "train": DATA_DIR / "code_names" / "train.tsv",
    "validation": DATA_DIR / "code_names" / "validation.tsv",
}
MISSING_WORD_FILES = {
    "train": DATA_DIR / "missing_word" / "train.tsv",
    "validation": DATA_DIR / "missing_word" / "validation.tsv",
}
EXTRA_IDS = 100  # sentinels for span corruption, at the top of the id range
MIXTURE_RATES = {"pydocs_span_corruption": 3.0, "pydocs_prefix_lm": 1.0}
FINETUNE_MIXTURE_RATES = {"pydocs_section_titles": 1.0, "pydocs_code_names": 1.0}
# Section titles keep unprefixed inputs (their results in benchmarks/RESULTS.md stay
# comparable); one prefixed task is enough to tell the two apart.
CODE_NAMES_PREFIX = "code name: "
MISSING_WORD_PREFIX = "missing word: "


def _check_files() -> None:
    for path in (VOCAB_PATH, *SPLIT_FILES.values(), *SECTION_TITLES_FILES.values(),
                 *CODE_NAMES_FILES.values(), *MISSING_WORD_FILES.values()):
        if not path.exists():
            raise FileNotFoundError(
                f"bundled data file is missing: {path}. Rebuild it from the repository "
                "root with `python -m data.build_corpus` (fine-tuning tasks: "
                "`python -m data.build_section_titles`, `python -m data.build_code_names`, "
                "`python -m data.build_missing_word`).")


def pydocs_vocabulary() -> seqio.SentencePieceVocabulary:
    """The bundled 8000-piece vocabulary plus EXTRA_IDS sentinels (8100 ids)."""
    return vocabularies.sentencepiece(path=str(VOCAB_PATH), extra_ids=EXTRA_IDS)


def register() -> None:
    """(Re-)registers every task and the mixture of this module."""
    _check_files()
    vocab = pydocs_vocabulary()
    patterns = {split: str(path) for split, path in SPLIT_FILES.items()}
    for name, objective in (("pydocs_span_corruption", "span_corruption"),
                            ("pydocs_lm", "lm"),
                            ("pydocs_prefix_lm", "prefix_lm")):
        # 2 MB of text: caching its tokens doubles throughput (benchmarks/RESULTS.md).
        user_tasks.register_text_task(name=name, patterns=patterns, objective=objective,
                                      vocabulary=vocab, cache_tokenized_in_memory=True)
    user_tasks.register_mixture(name="pydocs_mixture", rates=MIXTURE_RATES)
    for name, files, prefix in (("pydocs_section_titles", SECTION_TITLES_FILES, ""),
                                ("pydocs_code_names", CODE_NAMES_FILES, CODE_NAMES_PREFIX),
                                ("pydocs_missing_word", MISSING_WORD_FILES,
                                 MISSING_WORD_PREFIX)):
        text_to_text.register_tsv_task(
            name=name, vocabulary=vocab,
            patterns={split: str(path) for split, path in files.items()},
            metric_fns=("exact_match", "rouge_l"), input_prefix=prefix)
    user_tasks.register_mixture(name="pydocs_finetune_mixture", rates=FINETUNE_MIXTURE_RATES)


register()
