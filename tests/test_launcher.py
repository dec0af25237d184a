"""The flags every entry point shares, and what a person sees from them: one
`error: <what> — <what to do>` line for anything they can fix."""

import re
import shutil
import subprocess
import sys
import time

import pytest

from launch import compile as compile_launcher
from launch import eval as eval_launcher
from launch import infer as infer_launcher
from launch import train as train_launcher
from launch_helpers import (REPO, checkpoint_steps, launch_in_process, read_only,
                            train_command, train_env)


def help_text(parse_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("parse_flags", [train_launcher.parse_flags,
                                         compile_launcher.parse_flags,
                                         eval_launcher.parse_flags,
                                         infer_launcher.parse_flags])
def test_help_lists_every_flag_with_a_meaning(parse_flags, capsys):
    lines = help_text(parse_flags, capsys).splitlines()
    flags = [i for i, line in enumerate(lines) if re.match(r"  --\w", line)]  # not wrapped text
    assert len(flags) >= 6
    for i in flags:
        spec, _, meaning = lines[i].strip().partition("  ")
        meaning = meaning.strip() or (lines[i + 1].strip() if i + 1 < len(lines) else "")
        assert meaning and not meaning.startswith("--"), f"no meaning for {spec}"
    text = "\n".join(lines)
    for shared in ("--gin_file", "--gin_bindings", "--gin.NAME", "--gin_search_paths",
                   "--verbosity"):
        assert shared in text


def test_both_launchers_share_one_flag_block():
    argv = ["--gin_file=a.gin", "--gin.TRAIN_STEPS=7", "--gin_bindings=BATCH_SIZE=4",
            "--gin_search_paths=/x", "--verbosity=1"]
    train_args, train_bindings = train_launcher.parse_flags(argv)
    compile_args, compile_bindings = compile_launcher.parse_flags(argv + ["--topology=v4-8"])
    assert train_bindings == compile_bindings == ["BATCH_SIZE=4", "TRAIN_STEPS=7"]
    for name in ("gin_file", "gin_search_paths", "verbosity"):
        assert getattr(train_args, name) == getattr(compile_args, name)


# --------------------------------------------------------------------------- errors

TINY, TEXT = "tests/configs/tiny_run.gin", "tests/configs/tiny_text_run.gin"
# name: (gin file, flags, what the line must say); {tmp} is a scratch folder.
BAD_INPUT = {
    "wrong-typed binding": (TINY, ["--gin.TRAIN_STEPS='ten'"],
                            ["gin binding train_loop.train.train_steps is 'ten' (a str); it must be an int"]),
    "wrong-typed run field": (TINY, ["--gin.BATCH_SIZE='4'"],
                              ["run_config.RunConfig.batch_size is '4'", "write 4, not '4'"]),
    "quoted number": (TINY, ["--gin.train_loop.train.checkpoint_every_steps='5'"],
                      ["checkpoint_every_steps is '5'", "write 5, not '5'"]),
    "empty corpus": (TEXT, ["--gin.TEXT_FILES='{tmp}/blank.txt'"],
                     ["task 'tiny_text' split 'train'", "yields no examples"]),
    "glob matching nothing": (TEXT, ["--gin.TEXT_FILES='{tmp}/nothing-*.txt'"],
                              ["no files match", "nothing-*.txt"]),
    "missing vocabulary": (TEXT, ["--gin.TEXT_FILES='{tmp}/text.txt'",
                                  "--gin.vocabularies.sentencepiece.path='{tmp}/no.model'"],
                           ["SentencePiece model not found", "no.model"]),
    "lengths too short": (TINY, ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 2}"],
                          ["targets length 2 is too short for span corruption"]),
}


def assert_one_line(line, *phrases):
    assert line is not None and line.startswith("error: ") and "\n" not in line, line
    assert " — " in line, line                              # what — what to do
    for phrase in phrases:
        assert phrase in line, (phrase, line)


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_before_the_model_is_built(tmp_path, case):
    gin_file, flags, phrases = BAD_INPUT[case]
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "text.txt").write_text("Some text to train on.\n" * 20)
    model_dir = tmp_path / "run"
    line = launch_in_process(str(model_dir), *(f.replace('{tmp}', str(tmp_path)) for f in flags),
                             gin_file=gin_file)
    assert_one_line(line, *phrases)
    # Checked before the model is built (its parameter table is written first).
    assert not (model_dir / "parameters.txt").exists()
    # The traceback is in the run's log file, which the line names.
    log_file = model_dir / "logs" / "train.log"
    assert f"(log: {log_file})" in line and "Traceback" in log_file.read_text()


@pytest.fixture
def finished_run(tmp_path, straight_run):
    """A copy of a finished 6-step run (checkpoints 4, 5, 6)."""
    model_dir = tmp_path / "run"
    shutil.copytree(straight_run, model_dir)
    return model_dir


def test_config_change_on_resume_is_one_line(finished_run):
    line = launch_in_process(str(finished_run), "--gin.TRAIN_STEPS=8",
                             "--gin.t5.T5Config.mlp_dim=96")
    assert_one_line(line, "does not match this run's train state", "mlp/wi_0/kernel",
                    "use a new MODEL_DIR")
    assert checkpoint_steps(str(finished_run)) == [4, 5, 6]


def checkpoint_files(model_dir):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (model_dir / "checkpoints").rglob("*") if p.is_file()}


@pytest.mark.parametrize("read_only_part", ["model_dir", "checkpoints"])
def test_read_only_model_dir_names_the_directory_and_keeps_the_checkpoints(
        finished_run, read_only_part):
    target = finished_run if read_only_part == "model_dir" else finished_run / "checkpoints"
    before = checkpoint_files(finished_run)
    with read_only(str(target)):
        line = launch_in_process(str(finished_run), "--gin.TRAIN_STEPS=8")
    assert_one_line(line, f"{target} is not writable", "(latest: step 6) are intact")
    assert checkpoint_files(finished_run) == before


def test_nan_halt_is_one_line(tmp_path):
    line = launch_in_process(str(tmp_path), "--gin.TRAIN_STEPS=3",
                             "--gin.optimizers.rsqrt_schedule.base_learning_rate=1e39")
    assert_one_line(line, "The update became NaN/Inf at step 1",
                    "no checkpoint was written before it", "start again")


def test_verbose_also_prints_the_traceback(tmp_path, capsys):
    line = launch_in_process(str(tmp_path), "--gin.TRAIN_STEPS='ten'", "--verbose")
    assert_one_line(line, "train_steps is 'ten'")
    assert "Traceback" in capsys.readouterr().err


def test_the_process_exits_1_printing_only_the_line(tmp_path):
    proc = subprocess.run(train_command(str(tmp_path), "--gin.TRAIN_STEPS='ten'"),
                          cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert_one_line(proc.stderr.strip(), "train_steps is 'ten'")


NON_DAEMON_THREAD_AND_AN_ERROR = r'''
import threading, time
from t5x_like import errors
from t5x_like.launch import launcher

def main():
    # What Orbax leaves behind after a failed write: a non-daemon thread that waits.
    threading.Thread(target=time.sleep, args=(600,), name="writer").start()
    with launcher.errors_reported(0):
        raise errors.NotWritableError("writing step 10 failed", fix="free disk space")

launcher.run_program(main)
'''


def test_an_error_exit_does_not_wait_for_library_threads():
    """A failed checkpoint write left Orbax's non-daemon threads running, and the
    interpreter waited for them after printing the error: the process never ended."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", NON_DAEMON_THREAD_AND_AN_ERROR], cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: writing step 10 failed — free disk space"
