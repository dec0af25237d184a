"""The bundled fine-tuning task: reproducible build, and the features it yields."""

import hashlib
import os
import pathlib

import numpy as np

from data import build_section_titles

REPO = pathlib.Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "section_titles"


def check_reproducible(build, bundled: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """`build` rewrites the shipped files byte for byte, and their SOURCE.md states
    their digests and the corpus licence (shared with test_code_names_task.py)."""
    hashes = build(tmp_path)
    for name, digest in hashes.items():
        assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name
        assert hashlib.sha256((bundled / name).read_bytes()).hexdigest() == digest
    source = (bundled / "SOURCE.md").read_text()
    for name in ("train.tsv", "validation.tsv"):
        assert f"`{hashes[name]}`" in source
    assert "PSF licence" in source and "data/corpus/LICENSE" in source


def check_first_validation_example(task_name: str, feature_lengths: dict, *, prefix: str,
                                   text: str, target: str):
    """A bundled text-to-text task yields its first validation row, `prefix + text`
    -> `target`, tokenized with EOS, scored by exact match and ROUGE-L (shared with
    test_code_names_task.py and test_missing_word_task.py). Returns that example and
    the vocabulary."""
    import data.tasks  # noqa: F401 - registers the tasks
    import seqio
    task = seqio.get_mixture_or_task(task_name)
    assert [f.__name__ for f in task.predict_metric_fns] == ["exact_match", "rouge_l"]
    first = next(iter(task.get_dataset(feature_lengths, split="validation",
                                       shuffle=False).as_numpy_iterator()))
    vocab = task.output_features["targets"].vocabulary
    assert first["targets_pretokenized"].decode() == target
    np.testing.assert_array_equal(first["targets"], vocab.encode(target) + [1])  # + EOS
    assert first["inputs_pretokenized"].decode() == prefix + text
    np.testing.assert_array_equal(first["inputs"], vocab.encode(prefix + text) + [1])
    return first, vocab


def test_build_is_reproducible_byte_for_byte(tmp_path):
    check_reproducible(build_section_titles.build, BUNDLED, tmp_path)
    train = (BUNDLED / "train.tsv").read_text(encoding="utf-8").splitlines()
    validation = (BUNDLED / "validation.tsv").read_text(encoding="utf-8").splitlines()
    assert (len(train), len(validation)) == (766, 100)
    assert all(line.count("\t") == 1 for line in train + validation)
    assert not {line.split("\t")[0] for line in train} & {line.split("\t")[0]
                                                         for line in validation}
    assert os.path.getsize(BUNDLED / "train.tsv") < 400_000


def test_sections_are_found_by_their_underlines():
    doc = ('Function definitions ******************** A function definition defines '
           'a function. Decorators ========== A decorator wraps it. | x ---- | table')
    assert list(build_section_titles.sections(doc)) == [
        ("Function definitions", "A function definition defines a function."),
        ("Decorators", "A decorator wraps it. | x ---- | table")]


def test_task_yields_tokenized_inputs_targets_and_the_original_title():
    import data.tasks  # noqa: F401 - registers the task
    import seqio
    task = seqio.get_mixture_or_task("pydocs_section_titles")
    assert [f.__name__ for f in task.predict_metric_fns] == ["exact_match", "rouge_l"]
    first = next(iter(task.get_dataset({"inputs": 256, "targets": 32}, split="validation",
                                       shuffle=False).as_numpy_iterator()))
    paragraph, title = (BUNDLED / "validation.tsv").read_text(
        encoding="utf-8").splitlines()[0].split("\t")
    vocab = task.output_features["targets"].vocabulary
    assert first["targets_pretokenized"].decode() == title == "Assignment statements"
    np.testing.assert_array_equal(first["targets"], vocab.encode(title) + [1])  # + EOS
    np.testing.assert_array_equal(first["inputs"], vocab.encode(paragraph) + [1])
    assert task.postprocess_fn(" Assignment\n statements ") == "Assignment statements"


def test_tsv_lines_without_input_and_target_are_skipped_and_counted(tmp_path):
    import seqio
    from t5x_like.data import sources, text_to_text
    path = tmp_path / "dev.tsv"
    path.write_text("a paragraph\tits title\nno tab here\n\tno input\nsecond\tone\n")
    sources.reset_skip_counts()
    name = text_to_text.register_tsv_task(name="tsv_skips", patterns={"validation": str(path)})
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"inputs": 16, "targets": 8}, split="validation", shuffle=False)
    assert [ex["targets_pretokenized"] for ex in ds.as_numpy_iterator()] == [b"its title",
                                                                             b"one"]
    assert sources.skip_counts() == {("tsv_skips", "not_input_tab_target"): 2}
