"""Metrics on decoded text, in seqio's `metric_fns` form, and their names for gin.

A seqio metric function takes `(targets, predictions)` (postprocessed strings, one
per example, in dataset order) and returns {name: value}; seqio's Evaluator calls it
after decoding the model's tokens with the task's vocabulary and applying the task's
`postprocess_fn` to both sides. A function of `(targets, scores)` is scored on
per-example log-likelihoods instead. Scores here are percentages (0-100), as T5
reports them.

  exact_match  share of predictions equal to their target, character for character
  rouge_l      ROUGE-L F1: longest common subsequence of tokens (Lin, 2004), per
               example, averaged. Tokens as in Google's `rouge-score` package
               without stemming: lower-cased, every run of characters outside
               [a-z0-9] is a separator.

Our own ROUGE-L (30 lines) rather than the `rouge-score` dependency: the metric is
small, and tests check it against hand-computed cases. TF-free, like everything
seqio-independent in the data package.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

MetricFn = Callable[..., dict[str, float]]

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def normalize_whitespace(text: str | bytes, example: Any = None,
                         is_target: bool = False) -> str:
    """A seqio `postprocess_fn`: text with every whitespace run collapsed to one space.

    Applied to targets and predictions alike, so a metric never counts a stray space
    or newline (the decoder may emit either) as an error.
    """
    del example, is_target
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return " ".join(text.split())


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    _check_aligned(targets, predictions)
    hits = sum(t == p for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / max(len(targets), 1)}


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the LCS of two token lists (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other
                           else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(target: str, prediction: str) -> float:
    """ROUGE-L F1 of one pair in [0, 1]: 2PR / (P + R) with P = LCS / |prediction|,
    R = LCS / |target|; 0 when either side has no tokens."""
    target_tokens, prediction_tokens = rouge_tokens(target), rouge_tokens(prediction)
    lcs = longest_common_subsequence(target_tokens, prediction_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction_tokens), lcs / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    _check_aligned(targets, predictions)
    scores = [rouge_l_f1(t, p) for t, p in zip(targets, predictions)]
    return {"rouge_l": 100.0 * sum(scores) / max(len(scores), 1)}


def _check_aligned(targets: Sequence[str], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


# --------------------------------------------------------------------------- names

METRICS: dict[str, MetricFn] = {"exact_match": exact_match, "rouge_l": rouge_l}

# The argument lists seqio accepts (seqio.metrics.LegacyMetric.empty).
_SIGNATURES = (("targets", "predictions"), ("targets", "scores"),
               ("targets", "predictions", "aux_values"))


def resolve(metric_fns: Sequence[str | MetricFn]) -> list[MetricFn]:
    """Names (see METRICS) or functions -> functions seqio can call.

    Checked here, when the task is registered, so a typo or a function with the
    wrong arguments stops the run at start-up instead of after the first checkpoint.
    """
    resolved = []
    for metric in metric_fns:
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; known metrics: "
                                 f"{sorted(METRICS)} (or pass a function of (targets, "
                                 "predictions) or (targets, scores))")
            metric = METRICS[metric]
        if not callable(metric):
            raise ValueError(f"metric {metric!r} is neither a metric name nor a function")
        required = tuple(
            name for name, p in inspect.signature(metric).parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if required not in _SIGNATURES:
            raise ValueError(
                f"metric function {getattr(metric, '__name__', metric)!r} takes "
                f"{required}; a seqio metric takes one of {list(_SIGNATURES)}")
        resolved.append(metric)
    return resolved
