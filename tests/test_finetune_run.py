"""Fine-tuning as a user runs it: pretrained checkpoint -> downstream task -> launch.eval,
whose task metrics score what `decoding.predict_batch` generates."""

import json
import os

import gin
import jax
import pytest
import seqio

import data.tasks  # noqa: F401 - registers pydocs_section_titles

from launch_helpers import run_launcher
from test_eval_predictions import LENGTHS, expected_predictions
from t5x_like.checkpointing import checkpoints
from t5x_like.config import gin_config
from t5x_like.training import run_config
from t5x_like.data import text_metrics

GIN = "tests/configs/tiny_finetune_run.gin"
TASK = "pydocs_section_titles"


def greedy_predictions(model_dir, pretrained, step, examples):
    """Greedy predict_batch (at most the target length) of checkpoint `step` on the
    examples, in batches of 8 built in numpy, one device, decoded with the task's
    vocabulary (test_eval_predictions.expected_predictions)."""
    gin_config.parse(gin_files=[GIN], gin_bindings=[f"MODEL_DIR = '{model_dir}'",
                                                   f"PRETRAINED_DIR = '{pretrained}'"])
    try:
        run = run_config.from_gin()
    finally:
        gin.clear_config()
    partitioner = run.partitioner()
    layout = run.state_layout(partitioner, run.feature_lengths())
    reader = checkpoints.CheckpointReader(os.path.join(model_dir, "checkpoints"))
    params = reader.restore_params(step, abstract_params=layout.abstract_with_shardings().params)
    reader.close()
    params = jax.device_put(params, jax.devices()[0])
    vocabulary = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
    return expected_predictions(run.model, params, examples, vocabulary)


@pytest.mark.slow   # the whole fine-tune story end to end, ~50 s; its parts have fast tests
def test_finetune_from_our_checkpoint_then_score_the_task_metrics(tmp_path, straight_run):
    model_dir = str(tmp_path)
    pretrained = f"{straight_run}/checkpoints"
    log = run_launcher("train", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'",
                       gin_file=GIN)
    assert f"Initialised 52/52 parameters from {straight_run}/checkpoints step 6" in log
    assert "step 2/2 | loss" in log and "lr 1.00e-03" in log          # constant LR
    assert f"eval step 2 | {TASK} | loss" in log                       # in-loop eval on
    operative = open(os.path.join(model_dir, "operative_config.gin")).read()
    assert "t5.T5Config.dropout_rate = 0.1" in operative

    log = run_launcher("eval", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'",
                       "--checkpoint=latest", gin_file=GIN)
    with open(os.path.join(model_dir, "eval", "checkpoint_2.json")) as f:
        record = json.load(f)
    scores = record["tasks"][TASK]
    assert {"loss", "accuracy", "perplexity", "greedy/exact_match",
            "greedy/rouge_l"} <= set(scores)
    assert f"eval step 2 | {TASK} | greedy/exact_match" in log

    # The scores are those of the model's own greedy decoding of the 16 examples
    # (tiny_finetune_run.gin's num_examples), and the record shows the first 8.
    raw = list(seqio.get_mixture_or_task(TASK).get_dataset(LENGTHS, split="validation",
                                                           shuffle=False)
               .take(16).as_numpy_iterator())
    targets = [ex["targets_pretokenized"].decode() for ex in raw]
    want = greedy_predictions(model_dir, pretrained, 2, raw)
    assert [(e["target"], e["prediction"]) for e in record["examples"][TASK]] == list(
        zip(targets, want))[:8]
    assert targets[0] == "Assignment statements"
    post = [text_metrics.normalize_whitespace(t) for t in want]
    assert scores["greedy/exact_match"] == pytest.approx(
        text_metrics.exact_match(targets, post)["exact_match"])
    assert scores["greedy/rouge_l"] == pytest.approx(
        text_metrics.rouge_l(targets, post)["rouge_l"])
