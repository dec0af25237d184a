"""launch.infer end to end through the real entry point (subprocesses): a trained
run's checkpoint (text prompts, and a seqio task split with beam search), a Hugging
Face directory with a SentencePiece tokenizer (against transformers' generate), and
the bad inputs, each a one-line named error with no traceback and exit code 1."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from launch_helpers import REPO, train_env

from t5x_like.checkpointing import checkpoints
from t5x_like.decoding import decode
from t5x_like.config import gin_config
from t5x_like.training import run_config

STEPS = 6


def _infer(*args, expect_rc=0):
  proc = subprocess.run([sys.executable, "-m", "launch.infer", *args], cwd=REPO,
                        env=train_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == expect_rc, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout + proc.stderr


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write_prompts(path, lines):
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return str(path)


TEXTS = ["The list type is a", "def f(x): return", "Raises ValueError when the file"]


# ------------------------------------------------------------------- a trained run

def test_infer_on_a_trained_run_matches_decoding_in_process(tmp_path, straight_run):
  """3 text prompts in batches of 2 (the last batch filled up); the CLI's predictions
  equal predict_batch on the checkpoint's parameters with the task's tokenization."""
  prompts = _write_prompts(tmp_path / "prompts.jsonl",
                           [json.dumps({"inputs": t}) for t in TEXTS[:2]] + [""]
                           + [json.dumps({"inputs": TEXTS[2]})])
  out = tmp_path / "out.jsonl"
  log = _infer("--gin_file=tests/configs/tiny_run.gin", f"--gin.MODEL_DIR='{straight_run}'",
               f"--input={prompts}", f"--output={out}", "--batch_size=2",
               f"--gin.decode.DecodeConfig.max_decode_length={STEPS}")
  assert "tok/s" in log and "Traceback" not in log
  records = _read_jsonl(out)
  assert [r["inputs"] for r in records] == TEXTS

  gin_config.reset()
  try:
    gin_config.parse(gin_files=["tests/configs/tiny_run.gin"],
                     gin_bindings=[f"MODEL_DIR='{straight_run}'"])
    run = run_config.from_gin()
    import data.tasks
    vocabulary = data.tasks.pydocs_vocabulary()
  finally:
    gin_config.reset()
  checkpointer = checkpoints.Checkpointer(directory=os.path.join(straight_run, "checkpoints"))
  params = checkpointer.read_state(checkpointer.latest_step())["params"]
  encoded = [vocabulary.encode(t) + [1] for t in TEXTS]
  tokens = np.zeros((3, 32), np.int32)
  for row, ids in zip(tokens, encoded):
    row[:len(ids)] = ids
  result = decode.predict_batch(run.model, params, {"encoder_input_tokens": tokens},
                                  config=decode.DecodeConfig(max_decode_length=STEPS))
  for record, ids, row, length, score in zip(records, encoded, np.asarray(result.tokens_BxL),
                                             result.lengths_B, result.scores_B):
    assert record["input_ids"] == ids
    expected = [int(t) for t in row[:length] if t != 1]
    assert record["prediction_ids"] == expected
    assert record["prediction"] == vocabulary.decode(expected)
    np.testing.assert_allclose(record["score"], float(score), rtol=1e-5)


def test_infer_reads_a_task_split_and_beam_searches(tmp_path, straight_run):
  out = tmp_path / "out.jsonl"
  _infer("--gin_file=tests/configs/tiny_run.gin", f"--gin.MODEL_DIR='{straight_run}'",
         "--task=pydocs_span_corruption", "--split=validation", "--limit=3", f"--output={out}",
         "--batch_size=4", "--gin.decode.DecodeConfig.num_beams=2",
         f"--gin.decode.DecodeConfig.max_decode_length={STEPS}", "--checkpoint=6")
  records = _read_jsonl(out)
  assert len(records) == 3
  for record in records:
    assert record["targets"] and record["inputs"] and record["input_ids"][-1] == 1
    assert len(record["prediction_ids"]) <= STEPS and record["score"] < 0


# ------------------------------------------------------------------- a Hugging Face directory

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random tiny Llama exported to safetensors, with the bundled SentencePiece model
  as its tokenizer.model (ids < 8000 fit the 8192-token vocabulary)."""
  import jax
  import flax.linen as nn
  from t5x_like.hf import llama
  from t5x_like.models import decoder
  config = decoder.DecoderConfig(vocab_size=8192, emb_dim=32, num_heads=4, num_kv_heads=2,
                                 head_dim=8, mlp_dim=64, num_layers=2,
                                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
  params = nn.unbox(decoder.DecoderOnlyModel(config=config).init_params(
      jax.random.key(3), batch_size=1, decoder_length=4))
  path = str(tmp_path_factory.mktemp("hf_llama_tok"))
  llama.export_checkpoint(params, config, path)
  shutil.copy(os.path.join(REPO, "data", "vocab", "pydocs_8k.model"),
              os.path.join(path, "tokenizer.model"))
  return path


def test_infer_on_a_hugging_face_directory_equals_generate(tmp_path, hf_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import sentencepiece
  prompts = _write_prompts(tmp_path / "p.jsonl", [json.dumps({"inputs": t}) for t in TEXTS])
  out = tmp_path / "out.jsonl"
  _infer(f"--hf_checkpoint={hf_dir}", f"--input={prompts}", f"--output={out}", "--batch_size=2",
         f"--gin.decode.DecodeConfig.max_decode_length={STEPS}")
  records = _read_jsonl(out)
  tokenizer = sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(hf_dir, "tokenizer.model"))
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  eos = model.config.eos_token_id
  for record, text in zip(records, TEXTS):
    ids = [model.config.bos_token_id] + tokenizer.encode(text)
    generated = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)[0, len(ids):].tolist()
    expected = generated[:generated.index(eos)] if eos in generated else generated
    assert record["input_ids"] == ids[1:]
    assert record["prediction_ids"] == expected
    assert record["prediction"] == tokenizer.decode(expected)


def test_a_hugging_face_llama_gets_its_context_as_prompt_slots(hf_dir):
  """max_position_embeddings=128 in config.json: 128 prompt slots (a longer prompt is
  a one-line error, test_bad_prompts_are_one_line_errors), EOS 2 from config.json."""
  import jax
  from t5x_like.decoding import inference
  from t5x_like.parallel import partitioning
  source = inference.from_hf(hf_dir, partitioner=partitioning.Partitioner(
      devices=jax.devices()[:1]))
  assert source.max_input_length == 128 and source.eos_id == 2


@pytest.mark.parametrize("files,slots", [
    ({"config.json": {"n_positions": 64}, "tokenizer_config.json": {"model_max_length": 256}},
     64),
    ({"tokenizer_config.json": {"model_max_length": 256}}, 256),
    ({"tokenizer_config.json": {"model_max_length": int(1e30)}}, 512),   # HF's "unset"
    ({}, 512),
])
def test_a_hugging_face_t5_gets_its_configured_input_length_as_prompt_slots(tmp_path, files,
                                                                            slots):
  import jax
  from t5x_like.decoding import inference
  from t5x_like.parallel import partitioning
  config = {"model_type": "t5", "eos_token_id": 1, **files.get("config.json", {})}
  (tmp_path / "config.json").write_text(json.dumps(config))
  if "tokenizer_config.json" in files:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config.json"]))
  source = inference.from_hf(str(tmp_path), partitioner=partitioning.Partitioner(
      devices=jax.devices()[:1]))
  assert source.max_input_length == slots


# ------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content,message", [
    ("", r"prompts file \S+ is empty — write one JSON object per line"),
    ('{"inputs": "fine"}\n\n{"inputs": "unterminated\n',
     r"line 3 of \S+ is not valid JSON \(.*\) — each line must be an object"),
    (json.dumps({"inputs": " ".join(["word"] * 600)}) + "\n",
     r"the prompt on line 1 of \S+ has \d+ tokens, more than the 128 prompt slots of the "
     r"cache — shorten it, or raise --max_input_length$"),
])
def test_bad_prompts_are_one_line_errors(tmp_path, hf_dir, content, message):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(content)
  log = _infer(f"--hf_checkpoint={hf_dir}", f"--input={prompts}",
               f"--output={tmp_path / 'out.jsonl'}", expect_rc=1)
  assert re.match("error: " + message, log.strip()) and len(log.strip().splitlines()) == 1, log
  assert not (tmp_path / "out.jsonl").exists()


def test_a_run_without_checkpoints_is_a_one_line_error(tmp_path):
  prompts = _write_prompts(tmp_path / "p.jsonl", [json.dumps({"inputs": "x"})])
  log = _infer("--gin_file=tests/configs/tiny_run.gin", f"--gin.MODEL_DIR='{tmp_path}'",
               f"--input={prompts}", f"--output={tmp_path / 'out.jsonl'}", expect_rc=1)
  assert log.strip() == (f"error: no checkpoints in {tmp_path}/checkpoints — train first "
                         "(python -m launch.train with the same --gin_file and MODEL_DIR), "
                         "or load a Hugging Face directory with --hf_checkpoint")
