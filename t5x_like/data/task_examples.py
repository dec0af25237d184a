"""What inference (launch.infer, t5x_like/decoding/inference.py) reads from a seqio task.

- `prompt_vocabulary`: the task's vocabulary for the feature a prompt goes into
  ('inputs', or 'targets' for targets-only tasks), and whether the task appends EOS
  to it, so a text prompt is tokenized exactly as the task tokenizes its inputs.
- `examples`: a split's examples in order, one by one (unpacked, unshuffled), as
  token ids and text, trimmed to the given lengths like the task's own batches.

seqio and TensorFlow stay here (the data layer); the inference module imports this
only when a run's task or vocabulary is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import seqio

from t5x_like.data import pipeline


def _task(name: str) -> seqio.Task | seqio.Mixture:
    pipeline.configure_tensorflow()
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError as e:
        raise ValueError(f"unknown seqio task or mixture {name!r} — import the module that "
                         "registers it (the bundled tasks: `import data.tasks` in a gin "
                         "file, as configs/base.gin does)") from e


def prompt_feature(name: str) -> str:
    """'inputs' for inputs/targets tasks, 'targets' for targets-only (LM) tasks."""
    return "inputs" if "inputs" in _task(name).output_features else "targets"


def prompt_vocabulary(name: str) -> tuple[seqio.Vocabulary, bool]:
    """(vocabulary, appends EOS) of the feature a prompt fills."""
    feature = _task(name).output_features[prompt_feature(name)]
    return feature.vocabulary, bool(feature.add_eos)


def _text(example: Mapping[str, Any], feature: str, vocabulary: seqio.Vocabulary) -> str:
    raw = example.get(f"{feature}_pretokenized")
    if raw is not None:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    return vocabulary.decode([int(t) for t in example[feature]])


def examples(name: str, *, split: str, feature_lengths: Mapping[str, int],
             limit: int | None = None) -> Iterator[dict[str, Any]]:
    """{'input_ids', 'inputs', 'target_ids', 'targets'} for each example of `split`.

    input_ids are the prompt feature's tokens as the task makes them (EOS included
    when the task appends it); targets are None for targets-only tasks.
    """
    task = _task(name)
    splits = getattr(getattr(task, "source", None), "splits", None)
    if splits and split not in splits:
        raise ValueError(f"task {name!r} has no split {split!r} — choose one of "
                         f"{sorted(splits)} with --split")
    feature = prompt_feature(name)
    lengths = {k: v for k, v in feature_lengths.items() if k in task.output_features}
    dataset = task.get_dataset(sequence_length=lengths, split=split, shuffle=False,
                               num_epochs=1)
    if limit is not None:
        dataset = dataset.take(limit)
    features = task.output_features
    for example in dataset.as_numpy_iterator():
        has_targets = feature == "inputs" and "targets" in example
        yield {"input_ids": [int(t) for t in example[feature]],
               "inputs": _text(example, feature, features[feature].vocabulary),
               "target_ids": [int(t) for t in example["targets"]] if has_targets else None,
               "targets": (_text(example, "targets", features["targets"].vocabulary)
                           if has_targets else None)}
