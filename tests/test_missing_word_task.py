"""The missing-word fine-tuning task: reproducible build, every target is the blanked
word of a corpus paragraph, validation text only from the held-out corpus file."""

import collections
import pathlib


from data import build_missing_word
from data.build_missing_word import BLANK
from data.build_section_titles import CORPUS_FILES, corpus_documents, paragraphs
from test_finetune_task import check_first_validation_example, check_reproducible

REPO = pathlib.Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "missing_word"


def rows(split):
    return [line.split("\t") for line in
            (BUNDLED / f"{split}.tsv").read_text(encoding="utf-8").splitlines()]


def corpus_paragraphs(path):
    return {p for document in corpus_documents(path) for p in paragraphs(document)}


def test_build_is_reproducible_byte_for_byte(tmp_path):
    check_reproducible(build_missing_word.build, BUNDLED, tmp_path)
    assert (BUNDLED / "train.tsv").stat().st_size < 1_000_000


def test_each_target_is_the_blanked_word_of_a_paragraph_of_its_corpus_file():
    train, validation = rows("train"), rows("validation")
    assert (len(train), len(validation)) == (3081, 512)
    train_file, validation_file = map(corpus_paragraphs, CORPUS_FILES)
    for split, examples, source in (("train", train, train_file),
                                    ("validation", validation, validation_file)):
        originals = collections.Counter()
        for blanked, word in examples:
            assert blanked.count(BLANK) == 1, blanked
            assert word.isascii() and word.isalpha(), word
            # The blank stands for one whole word, and putting it back gives the text.
            assert f" {blanked} ".count(f" {BLANK} ") == 1, blanked
            original = blanked.replace(BLANK, word)
            assert original in source, (split, blanked)
            # Validation text was never read in pretraining (the 'train' corpus file).
            assert split == "train" or original not in train_file, blanked
            originals[original] += 1
        assert max(originals.values()) == (1 if split == "train" else 4)
    # Several blanks per held-out paragraph, each a different word position.
    assert len({b for b, _ in validation}) == len(validation)
    assert validation[0][0].startswith("Function definitions ******************** A "
                                       f"function definition {BLANK} a user-defined")
    assert validation[0][1] == "defines"


def test_blanks_are_a_fixed_choice_of_whole_words_of_letters():
    paragraph = "The int() call returns an integer, or raises ValueError for bad input."
    pairs = build_missing_word.blanks(paragraph, 20)
    # 'int()', 'integer,' and 'input.' are not whole words of letters.
    assert [word for _, word in pairs] == ["The", "call", "returns", "an", "or", "raises",
                                           "ValueError", "for", "bad"]
    assert pairs[1][0] == (f"The int() {BLANK} returns an integer, or raises ValueError "
                           "for bad input.")
    # The choice is fixed by the paragraph's hash, in word order.
    assert build_missing_word.blanks(paragraph, 2) == [pairs[1], pairs[4]]
    assert build_missing_word.blanks("x1 y_2 3.5 (z)", 1) == []


def test_the_commonest_answer_scores_seven_percent_of_validation():
    """The share of the commonest answer is what guessing by the answers' frequencies
    scores: the floor a fine-tuned model's exact match is read against."""
    answers = collections.Counter(word for _, word in rows("validation"))
    assert answers.most_common(1)[0] == ("the", 37)          # 7.2% of 512
    assert collections.Counter(word for _, word in rows("train")).most_common(1)[0][0] == "the"


def test_the_task_yields_the_prefixed_paragraph_and_its_word():
    blanked, word = rows("validation")[0]
    check_first_validation_example("pydocs_missing_word", {"inputs": 256, "targets": 16},
                                   prefix="missing word: ", text=blanked, target=word)
