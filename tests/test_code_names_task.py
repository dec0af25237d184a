"""The second bundled fine-tuning task and the fine-tuning mixture: reproducible
build, the examples it holds, and the mixture sampling its tasks at their rates."""

import os
import pathlib
import re

import numpy as np
import pytest

from data import build_code_names
from test_finetune_task import check_first_validation_example, check_reproducible

REPO = pathlib.Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "code_names"
# An identifier or dotted name, optionally called, in double quotes.
QUOTED_NAME = re.compile(r'"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\(\))?"')


def rows(split, folder=BUNDLED):
    return [line.split("\t") for line in
            (folder / f"{split}.tsv").read_text(encoding="utf-8").splitlines()]


def test_build_is_reproducible_byte_for_byte(tmp_path):
    check_reproducible(build_code_names.build, BUNDLED, tmp_path)
    assert os.path.getsize(BUNDLED / "train.tsv") < 400_000


def test_each_target_is_the_first_quoted_code_name_of_its_paragraph():
    train, validation = rows("train"), rows("validation")
    assert (len(train), len(validation)) == (822, 104)
    assert all(len(row) == 2 for row in train + validation)
    assert not {p for p, _ in train} & {p for p, _ in validation}
    for paragraph, name in train + validation:
        assert QUOTED_NAME.fullmatch(name), name
        # The answer is in the input, and no other quoted name comes before it.
        before = paragraph[:paragraph.index(name)]
        assert not re.search(r'(^|[ (])' + QUOTED_NAME.pattern, before), paragraph
    assert validation[0][1] == '"AttributeError"'
    assert build_code_names.first_code_name(
        'Use "str.format()" or "%" with "x.y", not “quoted prose”.') == '"str.format()"'
    assert build_code_names.first_code_name('It returns x"y" and “z”.') is None


def mixture_task_shares(mixture, lengths, examples):
    """Share of code-names rows among `examples` unpacked training rows of a mixture
    of the two fine-tuning tasks, through the training pipeline (SeqioDataSource). A
    row's task is told by its (input, target) tokens, looked up in the two TSV files
    tokenized as the pipeline does (encode_tf: Python's SentencePiece breaks some ties
    differently, e.g. in runs of '-')."""
    import seqio
    import tensorflow as tf
    from t5x_like.data import pipeline
    vocab = seqio.get_mixture_or_task("pydocs_code_names").output_features[
        "targets"].vocabulary
    from data.tasks import CODE_NAMES_PREFIX
    task_of = {}
    for task, folder, prefix in (("code_names", BUNDLED, CODE_NAMES_PREFIX),
                                 ("section_titles", REPO / "data" / "section_titles", "")):
        pairs = [(prefix + paragraph, target) for paragraph, target in rows("train", folder)]
        tokens = [vocab.encode_tf(tf.constant([row[i] for row in pairs])).to_list()
                  for i in (0, 1)]
        for key in zip(map(tuple, tokens[0]), map(tuple, tokens[1])):
            task_of[key] = "both" if task_of.get(key, task) != task else task
    source = pipeline.SeqioDataSource(mixture_or_task_name=mixture,
                                      task_feature_lengths=lengths, pack=False)
    batches = source.dataset(per_host_batch_size=100, shard_index=0, num_shards=1)
    counts = dict.fromkeys(("code_names", "section_titles", "both"), 0)
    for batch in batches.take(examples // 100).as_numpy_iterator():
        for inputs, targets in zip(batch["encoder_input_tokens"],
                                   batch["decoder_target_tokens"]):
            key = tuple(tuple(int(t) for t in ids if t > 1) for ids in (inputs, targets))
            counts[task_of[key]] += 1          # a KeyError: a row of neither task
    assert counts["both"] < 0.01 * examples
    return counts["code_names"] / examples


def test_the_finetune_mixture_samples_its_tasks_at_their_rates():
    import data.tasks
    from t5x_like.data import user_tasks
    assert data.tasks.FINETUNE_MIXTURE_RATES == {"pydocs_section_titles": 1.0,
                                                 "pydocs_code_names": 1.0}
    # 2000 rows: a share's binomial standard deviation is at most 1.1 points, so 4.5
    # points is 4 of them (a false alarm once in ~16,000 seeds); a mixture that ignored
    # its rates (0.5 for 3:1) misses by 25 points.
    lengths = {"inputs": 256, "targets": 32}
    assert mixture_task_shares("pydocs_finetune_mixture", lengths, 2000) == pytest.approx(
        0.5, abs=0.045)
    user_tasks.register_mixture(name="test_code_names_3_to_1", rates={
        "pydocs_section_titles": 1.0, "pydocs_code_names": 3.0})
    assert mixture_task_shares("test_code_names_3_to_1", lengths, 2000) == pytest.approx(
        0.75, abs=0.04)


def test_the_task_yields_the_paragraph_and_its_quoted_name():
    paragraph, name = rows("validation")[0]
    first, vocab = check_first_validation_example(
        "pydocs_code_names", {"inputs": 256, "targets": 32}, prefix="code name: ",
        text=paragraph, target=name)
    # The name is tokenized as in its paragraph, but for the closing quote, which may
    # merge with punctuation ('"AttributeError")." -> ... 'AttributeError' '").'): the
    # model can mostly copy token for token.
    def within(ids, inputs):
        return any(inputs[i:i + len(ids)] == ids for i in range(len(inputs)))
    assert within(vocab.encode(name)[:-1], list(first["inputs"]))
    copies = [within(vocab.encode(n), vocab.encode(p)) for p, n in rows("validation")]
    assert 0.6 < np.mean(copies) < 0.9


def test_no_input_of_the_finetune_mixture_asks_for_two_answers():
    """Both tasks cut the same corpus alike, so a paragraph can be an example of each
    with different targets: without a task prefix (T5's 'summarize: ') the model sees
    one input with two answers (a run without one answered code names to section-title
    inputs at step 200). Every input of the mixture must have one answer."""
    import data.tasks  # noqa: F401 - registers the tasks
    import seqio
    targets_of = {}
    for task in seqio.get_mixture_or_task("pydocs_finetune_mixture").tasks:
        for split in ("train", "validation"):
            for ex in task.get_dataset({"inputs": 256, "targets": 32}, split=split,
                                       shuffle=False).as_numpy_iterator():
                targets_of.setdefault(ex["inputs_pretokenized"], set()).add(
                    ex["targets_pretokenized"])
    assert len(targets_of) == 766 + 100 + 822 + 104
    assert all(len(targets) == 1 for targets in targets_of.values())
