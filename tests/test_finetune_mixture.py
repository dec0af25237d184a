"""Multi-task fine-tuning (configs/finetune_mixture.gin, shrunk): in-loop eval and
launch.eval report each task of the mixture under its own name, with numbers that
agree between the two and with a recomputation of the task metrics."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch_helpers import launch_in_process
from t5x_like.data import text_metrics

GIN = "tests/configs/tiny_finetune_mixture_run.gin"
TASKS = ("pydocs_code_names", "pydocs_section_titles")
TEACHER_FORCED = ("loss", "cross_entropy", "perplexity", "accuracy", "target_tokens")


def scalars(logdir):
    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in acc.Tags()["scalars"]}


@pytest.mark.slow   # ~70 s of CPU, mostly compiling; the next test covers the metrics fast
def test_in_loop_eval_and_launch_eval_score_each_task_of_the_mixture(tmp_path):
    model_dir = str(tmp_path)
    assert launch_in_process(model_dir, gin_file=GIN) is None           # 2 steps
    assert sorted(os.listdir(os.path.join(model_dir, "eval"))) == sorted(TASKS)
    in_loop = {task: scalars(os.path.join(model_dir, "eval", task)) for task in TASKS}
    for task in TASKS:
        assert set(in_loop[task]) == set(TEACHER_FORCED)
        assert all(sorted(values) == [1, 2] for values in in_loop[task].values())
    # Each task is scored on its own validation data, not on the mixture's.
    assert in_loop[TASKS[0]]["loss"][2] != in_loop[TASKS[1]]["loss"][2]
    assert in_loop[TASKS[0]]["target_tokens"][2] != in_loop[TASKS[1]]["target_tokens"][2]

    assert launch_in_process(model_dir, "--checkpoint=latest", gin_file=GIN,
                             launcher="eval") is None
    with open(os.path.join(model_dir, "eval", "checkpoint_2.json")) as f:
        record = json.load(f)
    assert sorted(record["tasks"]) == sorted(TASKS)
    for task in TASKS:
        scores = record["tasks"][task]
        assert set(scores) == {*TEACHER_FORCED, "greedy/exact_match", "greedy/rouge_l"}
        for name in TEACHER_FORCED:            # launch.eval == in-loop eval, same params
            assert scores[name] == pytest.approx(in_loop[task][name][2], rel=1e-6), name
        # num_examples = 8: every scored example is in the record; recompute its metrics.
        pairs = [(e["target"], e["prediction"]) for e in record["examples"][task]]
        assert len(pairs) == 8
        targets = [t for t, _ in pairs]
        post = [text_metrics.normalize_whitespace(p) for _, p in pairs]
        assert scores["greedy/exact_match"] == pytest.approx(
            text_metrics.exact_match(targets, post)["exact_match"])
        assert scores["greedy/rouge_l"] == pytest.approx(
            text_metrics.rouge_l(targets, post)["rouge_l"])
        # TensorBoard: the task's decoded metrics beside its teacher-forced ones.
        written = scalars(os.path.join(model_dir, "eval", task))
        assert written["greedy/exact_match"] == {2: pytest.approx(
            scores["greedy/exact_match"])}
    # The first validation example of each task, as the TSV files hold it.
    assert record["examples"]["pydocs_code_names"][0]["target"] == '"AttributeError"'
    assert record["examples"]["pydocs_section_titles"][0]["target"] == \
        "Assignment statements"


def test_task_metrics_of_a_mixture_score_each_task_on_its_own_predictions():
    """The decoded-metrics path without a model: a predictor that answers every
    code-names example right (looked up by its input tokens) and nothing else."""
    import data.tasks  # noqa: F401 - registers the mixture
    import seqio
    from t5x_like.data import pipeline
    lengths = {"inputs": 256, "targets": 32}
    answers = {}
    for ex in seqio.get_mixture_or_task("pydocs_code_names").get_dataset(
            lengths, split="validation", shuffle=False).as_numpy_iterator():
        answers[tuple(ex["inputs"].tolist())] = ex["targets"].tolist()[:-1]   # no EOS
    source = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_finetune_mixture",
                                      task_feature_lengths=lengths)
    scorer = source.prediction_metrics(split="validation", num_examples=20)
    assert sorted(scorer.task_names) == sorted(TASKS)

    def predict(batch):
        return [answers.get(tuple(t for t in row.tolist() if t), [])
                for row in batch["encoder_input_tokens"]]
    scores, examples = scorer.evaluate(predict=predict, score=None, batch_size=8)
    scorer.close()
    assert sorted(scores) == sorted(TASKS)
    assert [len(examples[task]) for task in TASKS] == [20, 20]
    assert scores["pydocs_code_names"] == {"exact_match": 100.0, "rouge_l": 100.0}
    assert all(target == prediction for target, prediction in examples[TASKS[0]])
    # The section-titles inputs (unprefixed) are none of code names' ('code name: ...').
    assert examples["pydocs_section_titles"][0] == ("Assignment statements", "")
    assert not any(p for _, p in examples["pydocs_section_titles"])
    assert scores["pydocs_section_titles"] == {"exact_match": 0.0, "rouge_l": 0.0}
