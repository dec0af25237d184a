"""A LoRA run as a user runs it: from a pretrained run's checkpoint, adapters only in
its checkpoints, the base recorded and checked, launch.eval on the adapters."""

import json
import os
import pathlib
import signal
import subprocess

import pytest

import data.tasks  # noqa: F401 - registers pydocs_section_titles

from launch_helpers import (REPO, launcher_command, logged_losses, run_launcher,
                            train_env, wait_for_checkpoint)
from t5x_like.checkpointing import checkpoints

GIN = "tests/configs/tiny_lora_run.gin"
TASK = "pydocs_section_titles"


def lora_run(model_dir, pretrained, *extra, expect_rc=0):
    return run_launcher("train", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'", *extra,
                        gin_file=GIN, expect_rc=expect_rc)


def test_lora_run_checkpoints_adapters_on_a_recorded_base_and_evaluates(
        tmp_path, straight_run):
    model_dir, pretrained = str(tmp_path / "lora"), f"{straight_run}/checkpoints"
    log = lora_run(model_dir, pretrained)
    assert f"Frozen base: {pretrained} step 6 (fingerprint" in log
    assert "training 10752 of the model's 584704 parameters" in log
    eval_line = next(line for line in log.splitlines()
                     if f"eval step 2 | {TASK} | loss" in line)

    # The checkpoint holds the adapters and their optimizer state, not the base.
    ckpt = os.path.join(model_dir, "checkpoints")
    reader = checkpoints.CheckpointReader(ckpt)
    params = [k for k in reader._state_metadata(2) if k.startswith("params/")]
    record = reader.read_base_model(2)
    reader.close()
    assert params and all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in params)
    assert len(params) == 2 * (7 * 2 + 11 * 2)    # tiny: 2+2 layers, all linear kernels
    assert record["directory"] == pretrained and record["step"] == 6
    state_bytes = lambda step_dir: sum(f.stat().st_size for f in pathlib.Path(
        step_dir, "state").rglob("*") if f.is_file())
    # (Measured: 0.88 MB, most of it Orbax's metadata, against the base's 3.5 MB.)
    assert state_bytes(f"{ckpt}/2") < state_bytes(f"{pretrained}/6") / 3

    # launch.eval reads the base from the record (PRETRAINED_DIR is not even valid
    # here) and scores exactly what in-loop eval scored.
    log = run_launcher("eval", model_dir, "--gin.PRETRAINED_DIR='/nonexistent'",
                       "--checkpoint=latest", gin_file=GIN)
    loss = eval_line.split("| loss ")[1].split(" |")[0]
    assert f"eval step 2 | {TASK} | loss {loss} |" in log
    with open(os.path.join(model_dir, "eval", "checkpoint_2.json")) as f:
        assert "greedy/exact_match" in json.load(f)["tasks"][TASK]

    # Exported for PEFT: the adapters of every linear module, rank 4.
    run_launcher("export", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'",
                 "--format=peft", f"--output_dir={tmp_path / 'adapter'}", gin_file=GIN)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["r"] == 4 and len(config["target_modules"]) == 7 * 2 + 11 * 2
    assert config["base_model_name_or_path"] is None     # our base: export it with hf

    # Resuming onto another base (the pretrained run's step 5) is one error line
    # naming both, and the adapters' checkpoints stay.
    log = lora_run(model_dir, pretrained, "--gin.init_from.InitFrom.step=5",
                   "--gin.TRAIN_STEPS=3", expect_rc=1)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log
    assert (f"trained on the base {pretrained} step 6 (fingerprint {record['fingerprint']})"
            in errors[0]) and f"this run's base is {pretrained} step 5" in errors[0]
    assert checkpoints.committed_steps(ckpt) == [1, 2]


@pytest.mark.slow   # three more runs, ~2.5 min
def test_a_sigkilled_lora_run_resumes_bit_exactly(tmp_path, straight_run):
    pretrained = f"{straight_run}/checkpoints"
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    lora_run(whole, pretrained, "--gin.TRAIN_STEPS=4")
    proc = subprocess.Popen(
        launcher_command("train", killed, f"--gin.PRETRAINED_DIR='{pretrained}'",
                         "--gin.TRAIN_STEPS=4", gin_file=GIN),
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    wait_for_checkpoint(killed, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lora_run(killed, pretrained, "--gin.TRAIN_STEPS=4")
    assert sorted(logged_losses(whole)) == [1, 2, 3, 4]
    resumed = logged_losses(killed)
    assert {s: resumed[s] for s in (3, 4)} == {s: logged_losses(whole)[s] for s in (3, 4)}


@pytest.mark.slow   # a LoRA run and an export, ~1.5 min
def test_merged_export_of_a_lora_run_loads_in_transformers(tmp_path, straight_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir, pretrained = str(tmp_path / "lora"), f"{straight_run}/checkpoints"
    lora_run(model_dir, pretrained)
    out = tmp_path / "merged"
    log = run_launcher("export", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'",
                       "--format=hf", f"--output_dir={out}", gin_file=GIN)
    assert "Exported step 2 (adapters merged into the base)" in log
    model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    names = {name for name, _ in model.named_parameters()}
    assert not any("lora" in n for n in names)
    with torch.no_grad():
        logits = model(input_ids=torch.ones((1, 4), dtype=torch.long),
                       decoder_input_ids=torch.zeros((1, 1), dtype=torch.long)).logits
    assert torch.isfinite(logits).all()
