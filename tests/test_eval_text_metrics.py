"""Exact match and ROUGE-L against hand-computed values; metric names for gin."""

import pytest

from t5x_like.data import text_metrics


@pytest.mark.parametrize("target, prediction, f1", [
    # LCS 5 of 6 target / 5 prediction tokens: P = 1, R = 5/6, F = 10/11.
    ("the cat sat on the mat", "the cat on the mat", 10 / 11),
    ("Function definitions", "Class definitions", 1 / 2),       # P = R = 1/2
    ('The "del" statement', "the del statement!", 1.0),         # case, punctuation
    ("a b c d", "d c b a", 1 / 4),                              # order matters: LCS 1
    ("a b a", "b a b a", 6 / 7),                                # LCS 3: P 3/4, R 1
    ("Coroutines", "", 0.0),
    ("", "", 0.0),
])
def test_rouge_l_f1_matches_hand_computed_values(target, prediction, f1):
    assert text_metrics.rouge_l_f1(target, prediction) == pytest.approx(f1, abs=1e-12)


def test_corpus_level_scores_are_percent_means_over_examples():
    targets = ["the cat sat on the mat", "Function definitions", "Coroutines"]
    predictions = ["the cat on the mat", "Function definitions", "coroutines"]
    assert text_metrics.rouge_l(targets, predictions) == {
        "rouge_l": pytest.approx(100 * (10 / 11 + 1 + 1) / 3)}
    # Exact match compares the (postprocessed) strings: case counts.
    assert text_metrics.exact_match(targets, predictions) == {
        "exact_match": pytest.approx(100 / 3)}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        text_metrics.exact_match(["a", "b"], ["a"])


def test_postprocess_collapses_whitespace_of_text_and_bytes():
    assert text_metrics.normalize_whitespace("  The  'del'\n statement ") == "The 'del' statement"
    assert text_metrics.normalize_whitespace(b"a\tb", example={}, is_target=True) == "a b"


def test_metric_names_resolve_and_bad_ones_are_named():
    assert text_metrics.resolve(["exact_match", "rouge_l"]) == [
        text_metrics.exact_match, text_metrics.rouge_l]

    def log_likelihood(targets, scores):
        return {"mean_score": sum(scores) / len(scores)}
    assert text_metrics.resolve([log_likelihood]) == [log_likelihood]
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; known metrics: "
                                         r"\['exact_match', 'rouge_l'\]"):
        text_metrics.resolve(["bleu"])
    with pytest.raises(ValueError, match=r"takes \('predictions',\)"):
        text_metrics.resolve([lambda predictions: {}])
