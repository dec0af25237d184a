"""launch.eval: which checkpoints it evaluates, what it remembers, and bad input."""

import json
import os
import shutil
import subprocess
import time

import pytest

from launch import eval as eval_launcher
from launch_helpers import REPO, launcher_command, run_launcher, train_env
from t5x_like.evaluation import checkpoint_eval
from t5x_like.config import gin_config
from test_eval_in_loop import eval_scalars

TASK = "pydocs_span_corruption"
EVAL_BATCHES = "--gin.checkpoint_eval.evaluate_checkpoints.eval_batches=2"


def copy_checkpoints(source_dir, model_dir, steps=None):
    """A run directory holding (some of) another run's checkpoints, nothing else."""
    source = os.path.join(source_dir, "checkpoints")
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
    for step in steps or sorted(int(d) for d in os.listdir(source) if d.isdigit()):
        partial = os.path.join(model_dir, "checkpoints", f"{step}.partial")
        shutil.copytree(os.path.join(source, str(step)), partial)
        os.rename(partial, os.path.join(model_dir, "checkpoints", str(step)))  # atomic


def record(model_dir, step):
    with open(os.path.join(model_dir, "eval", f"checkpoint_{step}.json")) as f:
        return json.load(f)


def evaluated_steps(log):
    return [int(line.split("Checkpoint step ")[1].split()[0]) for line in log.splitlines()
            if "evaluated: " in line]


def test_step_all_and_latest_evaluate_each_checkpoint_once(tmp_path, eval_run):
    model_dir = str(tmp_path)
    copy_checkpoints(eval_run[0], model_dir)                       # steps 4, 5, 6
    assert evaluated_steps(run_launcher("eval", model_dir, "--checkpoint=5",
                                        EVAL_BATCHES)) == [5]
    written = os.path.getmtime(os.path.join(model_dir, "eval", "checkpoint_5.json"))
    assert evaluated_steps(run_launcher("eval", model_dir, "--checkpoint=all",
                                        EVAL_BATCHES)) == [4, 6]   # 5 was done
    log = run_launcher("eval", model_dir, "--checkpoint=latest", EVAL_BATCHES)
    assert evaluated_steps(log) == [] and "Checkpoint step 6 was evaluated before" in log
    assert os.path.getmtime(os.path.join(model_dir, "eval", "checkpoint_5.json")) == written

    # launch.eval reports what in-loop eval reported for the same parameters.
    in_loop = eval_scalars(eval_run[0])
    for step in (4, 6):
        for name, values in in_loop.items():
            assert record(model_dir, step)["tasks"][TASK][name] == pytest.approx(
                values[step], rel=1e-6), name
    assert record(model_dir, 4)["settings"] == {
        "split": "validation", "eval_batches": 2, "batch_size": 8,
        "predictor": {"name": "greedy", "seed": 0, "config": None}, "num_examples": None}


def test_records_remember_steps_per_settings(tmp_path):
    records = checkpoint_eval.EvalRecords(str(tmp_path), settings={"eval_batches": 2})
    assert records.done() == set()
    records.write(4, {"task": {"loss": 1.0}}, examples={"task": [("a title", "a guess")]})
    records.write(6, {"task": {"loss": 0.5}}, examples={})
    (tmp_path / "checkpoint_8.json").write_text('{"step": 8, "sett')    # torn write
    assert records.done() == {4, 6}
    # Other settings are other work: those steps are evaluated again.
    assert checkpoint_eval.EvalRecords(str(tmp_path), settings={"eval_batches": 1}).done() \
        == set()
    assert json.loads((tmp_path / "checkpoint_4.json").read_text())["examples"] == {
        "task": [{"target": "a title", "prediction": "a guess"}]}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_watch_evaluates_checkpoints_as_they_appear_until_the_final_step(tmp_path, eval_run):
    model_dir = str(tmp_path)
    proc = subprocess.Popen(
        launcher_command("eval", model_dir, "--watch", "--checkpoint=all",
                         "--poll_seconds=0.2", "--timeout=300", EVAL_BATCHES,
                         "--gin.TRAIN_STEPS=6"),
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        for step in (4, 5, 6):          # as a training job would commit them
            time.sleep(1.0)
            assert proc.poll() is None
            copy_checkpoints(eval_run[0], model_dir, steps=[step])
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Step 6 is evaluated; stopped watching." in out
    assert evaluated_steps(out)[-1] == 6 and sorted(set(evaluated_steps(out))) == \
        sorted(evaluated_steps(out))
    assert {s for s in (4, 5, 6)
            if os.path.exists(os.path.join(model_dir, "eval", f"checkpoint_{s}.json"))} \
        == set(evaluated_steps(out))


def test_a_directory_without_checkpoints_is_a_one_line_error(tmp_path):
    log = run_launcher("eval", str(tmp_path), expect_rc=1)
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1] == (
        f"error: no checkpoints in {tmp_path}/checkpoints — train first (python -m "
        "launch.train with the same gin files), check MODEL_DIR, or pass --watch to "
        "wait for them")


# ------------------------------------------------------------ bad input, in process

@pytest.fixture
def clean_gin():
    gin_config.reset()
    yield
    gin_config.reset()


def eval_error(*argv):
    gin_config.reset()
    with pytest.raises(SystemExit) as exit_info:
        eval_launcher.main(["--gin_file=tests/configs/tiny_run.gin", *argv])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_step_that_does_not_exist_lists_the_ones_that_do(tmp_path, eval_run, clean_gin):
    copy_checkpoints(eval_run[0], str(tmp_path), steps=[4, 6])
    assert eval_error(f"--gin.MODEL_DIR='{tmp_path}'", "--checkpoint=5") == (
        f"error: checkpoint step 5 does not exist in {tmp_path}/checkpoints — steps there: "
        "[4, 6]")
    assert eval_error(f"--gin.MODEL_DIR='{tmp_path}'", "--checkpoint=newest") == (
        "error: --checkpoint must be 'latest', 'all' or a step number, got 'newest'")


def write_task_gin(tmp_path, metric):
    path = tmp_path / "my_task.gin"
    path.write_text(f"""
from __gin__ import dynamic_registration
from t5x_like.data import text_metrics
from t5x_like.data import text_to_text
include 'tests/configs/tiny_run.gin'
MIXTURE_OR_TASK_NAME = @text_to_text.register_tsv_task()
text_to_text.register_tsv_task:
  name = 'my_titles'
  patterns = {{'validation': 'data/section_titles/validation.tsv',
              'train': 'data/section_titles/train.tsv'}}
  metric_fns = ['exact_match', {metric}]
""")
    return str(path)


def test_an_unknown_metric_name_is_named(tmp_path, clean_gin):
    with pytest.raises(SystemExit) as exit_info:
        eval_launcher.main([f"--gin_file={write_task_gin(tmp_path, repr('bleu'))}",
                            f"--gin.MODEL_DIR='{tmp_path}'"])
    assert str(exit_info.value) == (
        "error: unknown metric 'bleu'; known metrics: ['exact_match', 'rouge_l'] (or pass "
        "a function of (targets, predictions) or (targets, scores))")


def test_an_unknown_metric_function_is_named(tmp_path, clean_gin):
    gin_file = write_task_gin(tmp_path, "@text_metrics.bleu")
    with pytest.raises(SystemExit) as exit_info:
        eval_launcher.main([f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{tmp_path}'"])
    assert str(exit_info.value) == (
        "error: Unknown gin reference @text_metrics.bleu: module t5x_like.data.text_metrics "
        f"has no such function or class ({gin_file}, line 11) — check the name")
