"""Fine-tuning as a user runs it: pretrained checkpoint -> downstream task -> launch.eval."""

import json
import os

from launch_helpers import run_launcher

GIN = "tests/configs/tiny_finetune_run.gin"
TASK = "pydocs_section_titles"


def test_finetune_from_our_checkpoint_then_score_the_task_metrics(tmp_path, straight_run):
    model_dir = str(tmp_path)
    pretrained = f"--gin.PRETRAINED_DIR='{straight_run}/checkpoints'"
    log = run_launcher("train", model_dir, pretrained, gin_file=GIN)
    assert f"Initialised 52/52 parameters from {straight_run}/checkpoints step 6" in log
    assert "step 2/2 | loss" in log and "lr 1.00e-03" in log          # constant LR
    assert f"eval step 2 | {TASK} | loss" in log                       # in-loop eval on
    operative = open(os.path.join(model_dir, "operative_config.gin")).read()
    assert "t5.T5Config.dropout_rate = 0.1" in operative

    log = run_launcher("eval", model_dir, pretrained, "--checkpoint=latest", gin_file=GIN)
    with open(os.path.join(model_dir, "eval", "checkpoint_2.json")) as f:
        record = json.load(f)
    scores = record["tasks"][TASK]
    assert {"loss", "accuracy", "perplexity", "teacher_forced_argmax/exact_match",
            "teacher_forced_argmax/rouge_l"} <= set(scores)
    assert 0.0 <= scores["teacher_forced_argmax/rouge_l"] <= 100.0
    examples = record["examples"][TASK]
    assert len(examples) == 8 and examples[0]["target"] == "Assignment statements"
    assert f"eval step 2 | {TASK} | teacher_forced_argmax/exact_match" in log
