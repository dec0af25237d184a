"""A prompt-tuning run as a user runs it: from a pretrained run's checkpoint, the
prompt alone in its checkpoints, launch.eval and launch.infer through the same
placeholders, and the settings that cannot work refused in one line."""

import json
import os

import pytest

import data.tasks  # noqa: F401 - registers pydocs_section_titles

from launch_helpers import run_launcher
from t5x_like.checkpointing import checkpoints

GIN = "tests/configs/tiny_prompt_run.gin"
TASK = "pydocs_section_titles"


def one_error_line(log):
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    return errors[0]


def test_prompt_run_checkpoints_the_prompt_evaluates_and_decodes(tmp_path, straight_run):
    model_dir, pretrained = str(tmp_path / "prompt"), f"{straight_run}/checkpoints"
    base = f"--gin.PRETRAINED_DIR='{pretrained}'"
    log = run_launcher("train", model_dir, base, gin_file=GIN)
    assert f"Frozen base: {pretrained} step 6 (fingerprint" in log
    assert "training 128 of the model's" in log       # 4 vectors of the tiny model's 32
    eval_line = next(line for line in log.splitlines()
                     if f"eval step 2 | {TASK} | loss" in line)

    ckpt = os.path.join(model_dir, "checkpoints")
    reader = checkpoints.CheckpointReader(ckpt)
    params = [k for k in reader._state_metadata(2) if k.startswith("params/")]
    reader.close()
    assert params == ["params/encoder/soft_prompt/prompt"]

    # launch.eval scores exactly what in-loop eval scored (the same placeholders),
    # and decodes the validation examples with the prompt.
    log = run_launcher("eval", model_dir, base, "--checkpoint=latest", gin_file=GIN)
    loss = eval_line.split("| loss ")[1].split(" |")[0]
    assert f"eval step 2 | {TASK} | loss {loss} |" in log
    with open(os.path.join(model_dir, "eval", "checkpoint_2.json")) as f:
        assert "greedy/exact_match" in json.load(f)["tasks"][TASK]

    out = tmp_path / "predictions.jsonl"
    run_launcher("infer", model_dir, base, f"--task={TASK}", "--limit=2",
                 f"--output={out}", gin_file=GIN)
    assert len(out.read_text().splitlines()) == 2

    # Out for PEFT (tests/test_hf_peft.py checks its logits).
    run_launcher("export", model_dir, base, "--format=peft",
                 f"--output_dir={tmp_path / 'adapter'}", gin_file=GIN)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", 4)


def test_no_hugging_face_weight_holds_a_soft_prompt(tmp_path):
    """--format=hf refuses a prompt run before it reads a checkpoint."""
    import types
    from t5x_like import errors
    from t5x_like.checkpointing import hf_export
    from t5x_like.finetuning import prompt_tuning
    from t5x_like.models import t5
    run = types.SimpleNamespace(model=t5.EncoderDecoderModel(
        config=t5.T5Config(vocab_size=64, emb_dim=8, num_heads=1, head_dim=8, mlp_dim=8,
                           num_encoder_layers=1, num_decoder_layers=1),
        adapter=prompt_tuning.PromptTuning(length=4)))
    with pytest.raises(errors.ConfigError, match="this run prompt-tunes"):
        hf_export.export_run_checkpoint(run=run, model_dir=str(tmp_path / "none"),
                                        checkpoint=None, kind="hf",
                                        output_dir=str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow   # a launcher start (~20 s); run_config's check has a fast test
def test_a_prompt_the_data_does_not_reserve_stops_before_model_init(tmp_path, straight_run):
    model_dir = str(tmp_path / "prompt")
    log = run_launcher("train", model_dir, f"--gin.PRETRAINED_DIR='{straight_run}/checkpoints'",
                       "--gin.pipeline.SeqioDataSource.soft_prompt_length=0", gin_file=GIN,
                       expect_rc=1)
    line = one_error_line(log)
    assert "soft prompt has 4 vectors but the data puts 0 placeholder tokens" in line
    assert not os.path.exists(os.path.join(model_dir, "checkpoints"))


def test_a_new_run_starts_its_prompt_from_the_base_embeddings(tmp_path, straight_run):
    """init='vocabulary' reads the loaded base: at a learning rate of 0 the first
    checkpoint's prompt is the base checkpoint's embeddings of the drawn tokens."""
    import jax
    import numpy as np
    from flax import traverse_util
    from t5x_like.finetuning import prompt_tuning
    model_dir, pretrained = str(tmp_path / "prompt"), f"{straight_run}/checkpoints"
    run_launcher("train", model_dir, f"--gin.PRETRAINED_DIR='{pretrained}'",
                 "--gin.prompt_tuning.PromptTuning.init='vocabulary'",
                 "--gin.optax.constant_schedule.value=0.0", "--gin.TRAIN_STEPS=1",
                 "--gin.train_loop.train.eval_every_steps=0", gin_file=GIN)

    def read(directory, step, path):
        """One parameter of a checkpoint, on this host."""
        reader = checkpoints.CheckpointReader(directory)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = traverse_util.unflatten_dict({
            key[len("params/"):]: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device)
            for key, meta in reader._state_metadata(step).items()
            if key.startswith("params/")}, sep="/")
        params = reader.restore_params(step, abstract_params=abstract)
        reader.close()
        return np.asarray(traverse_util.flatten_dict(params, sep="/")[path])

    prompt = read(os.path.join(model_dir, "checkpoints"), 1, "encoder/soft_prompt/prompt")
    table = read(pretrained, 6, "token_embedder/embedding")
    ids = prompt_tuning.PromptTuning(length=4, init="vocabulary").vocabulary_ids(
        seed=0, vocab_size=table.shape[0])
    np.testing.assert_array_equal(prompt, table[ids])
