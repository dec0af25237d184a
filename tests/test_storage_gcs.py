"""MODEL_DIR in a bucket: the real launchers against a local GCS emulator.

The emulator (tests/gcs_emulator.py, gcp-storage-emulator from PyPI) runs on a
loopback port; each launcher is given `STORAGE_EMULATOR_HOST` and nothing else, as a
user of Google's client libraries would set it. Every file of the run (checkpoints,
data positions, events, config, parameter table, log, eval records, predictions)
must be in the bucket, the run must resume bit-exactly after a SIGKILL, and nothing
may appear in the working directory (a gs:// MODEL_DIR used to become `<cwd>/gs:/`).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gcs_emulator import running_emulator
from launch_helpers import (REPO, launch_in_process, logged_losses, train_command,
                            train_env)

BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def emulator():
    with running_emulator(BUCKET) as url:
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url        # for reading back in this process
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST")
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


def env_with(url):
    return {**train_env(), "STORAGE_EMULATOR_HOST": url}


def run(args, url, *, expect_rc=0):
    proc = subprocess.run(args, cwd=REPO, env=env_with(url), capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, log[-4000:]
    return log


def repo_entries():
    """What the working directory holds (launchers run in the repository root)."""
    return {name for name in os.listdir(REPO)
            if name not in (".pytest_cache", "__pycache__")}


def download(url_dir, local_dir):
    """Copies the objects directly under `url_dir` to `local_dir`."""
    from t5x_like import storage
    os.makedirs(local_dir, exist_ok=True)
    for name in storage.list_dir(url_dir):
        data = storage.path(url_dir, name).read_bytes()
        with open(os.path.join(local_dir, name), "wb") as f:
            f.write(data)
    return local_dir


def committed(url_dir):
    from t5x_like import storage
    from t5x_like.checkpointing import checkpoints
    directory = storage.join(url_dir, "checkpoints")
    return checkpoints.committed_steps(directory) if storage.is_dir(directory) else []


@pytest.fixture(scope="module")
def gs_run(emulator, straight_run):
    """straight_run's 6 steps with MODEL_DIR in the bucket, SIGKILLed after step 3's
    checkpoint and rerun: (model_dir URL, logs of both runs, working-dir entries
    before)."""
    model_dir = f"gs://{BUCKET}/run"
    before = repo_entries()
    proc = subprocess.Popen(train_command(model_dir, "--gin.TRAIN_STEPS=6",
                                          "--gin.train_loop.train.async_checkpointing=False"),
                            cwd=REPO, env=env_with(emulator), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while 3 not in committed(model_dir):
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, "no checkpoint 3 in the bucket after 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    first_log = proc.communicate(timeout=60)[0]
    killed_at = committed(model_dir)[-1]
    assert proc.returncode == -signal.SIGKILL and killed_at < 6, first_log[-3000:]
    second_log = run(train_command(model_dir, "--gin.TRAIN_STEPS=6"), emulator)
    assert f"Resumed from checkpoint at step {killed_at} in {model_dir}/checkpoints" \
        in second_log
    assert "continue from their saved positions" in second_log
    return model_dir, first_log + second_log, before


def test_a_bucket_model_dir_resumes_bit_exactly_and_nothing_is_written_locally(
        gs_run, straight_run, tmp_path):
    from t5x_like import storage
    from t5x_like.checkpointing import checkpoints
    model_dir, _, before = gs_run
    assert repo_entries() == before, repo_entries() ^ before     # no '<cwd>/gs:/'
    assert not os.path.exists(os.path.join(REPO, "gs:"))
    assert storage.list_dir(model_dir) == ["checkpoints", "logs", "operative_config.gin",
                                           "parameters.txt", "train"]
    assert "train_loop.train.model_dir" in storage.read_text(f"{model_dir}/operative_config.gin")
    assert "token_embedder" in storage.read_text(f"{model_dir}/parameters.txt")
    log = storage.read_text(f"{model_dir}/logs/train.log")      # both runs, appended
    assert log.count("Initialised a new model") == 1 and "Resumed from checkpoint" in log

    # The curve TensorBoard shows (two event files, one per run) is the straight run's.
    events = download(f"{model_dir}/train", str(tmp_path / "train"))
    assert len(os.listdir(events)) == 2
    assert logged_losses(str(tmp_path)) == logged_losses(straight_run)

    # So are the final parameters and optimizer state, bit for bit.
    in_bucket = checkpoints.Checkpointer(directory=f"{model_dir}/checkpoints")
    on_disk = checkpoints.Checkpointer(directory=os.path.join(straight_run, "checkpoints"))
    try:
        jax.tree.map(np.testing.assert_array_equal, in_bucket.read_state(6),
                     on_disk.read_state(6))
        positions = in_bucket.read_shard_positions(6, shards=[0, 1], num_data_shards=2)
        assert sorted(positions) == [0, 1] and all(positions.values())
    finally:
        in_bucket.close()
        on_disk.close()


@pytest.mark.slow
def test_eval_and_infer_read_the_bucket_and_write_their_results_there(
        gs_run, emulator, straight_run, tmp_path):
    from t5x_like import storage
    model_dir, _, _ = gs_run
    run([sys.executable, "-m", "launch.eval", "--gin_file=tests/configs/tiny_run.gin",
         f"--gin.MODEL_DIR='{model_dir}'", "--checkpoint=latest",
         "--gin.checkpoint_eval.evaluate_checkpoints.eval_batches=2"], emulator)
    record = json.loads(storage.read_text(f"{model_dir}/eval/checkpoint_6.json"))
    scores = record["tasks"]["pydocs_span_corruption"]
    assert record["step"] == 6 and np.isfinite(scores["loss"]), record
    assert any(n.startswith("events.") for n in storage.list_dir(
        f"{model_dir}/eval/pydocs_span_corruption"))

    # Prompts read from the bucket, predictions written there: the same tokens as
    # decoding the local straight run (bit-equal parameters, see above).
    storage.write_text(f"{model_dir}/prompts.jsonl",
                       '{"inputs": "The list type is a"}\n{"inputs": "Raises ValueError"}\n')
    infer = [sys.executable, "-m", "launch.infer", "--gin_file=tests/configs/tiny_run.gin",
             "--batch_size=2", "--gin.decode.DecodeConfig.max_decode_length=6"]
    run(infer + [f"--gin.MODEL_DIR='{model_dir}'", f"--input={model_dir}/prompts.jsonl",
                 f"--output={model_dir}/predictions.jsonl"], emulator)
    local_prompts = tmp_path / "prompts.jsonl"
    local_prompts.write_text(storage.read_text(f"{model_dir}/prompts.jsonl"))
    run(infer + [f"--gin.MODEL_DIR='{straight_run}'", f"--input={local_prompts}",
                 f"--output={tmp_path / 'predictions.jsonl'}"], emulator)
    from_bucket = [json.loads(line) for line in
                   storage.read_text(f"{model_dir}/predictions.jsonl").splitlines()]
    local = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(from_bucket) == 2
    assert [r["prediction_ids"] for r in from_bucket] == [r["prediction_ids"] for r in local]


def test_a_storage_client_that_is_not_installed_is_one_line_before_any_work(
        monkeypatch, tmp_path):
    from t5x_like import storage
    monkeypatch.setitem(storage._SCHEME_PACKAGES, "gs", "no_such_gcs_client")
    started = time.time()
    line = launch_in_process(f"gs://{BUCKET}/never")
    assert line.startswith("error: MODEL_DIR gs://test-bucket/never needs the "
                           "no_such_gcs_client package, which is not installed — pip "
                           "install 't5x_like[gcs]'"), line
    assert time.time() - started < 20
    line = launch_in_process("ftp://host/run")
    assert line.startswith("error: MODEL_DIR ftp://host/run: the scheme ftp:// is not "
                           "supported"), line


def test_log_and_event_files_in_a_bucket_grow_across_writers(emulator, tmp_path,
                                                              monkeypatch):
    """Object stores cannot append: the log continues what an earlier process wrote,
    and the event writer starts a new file past its size bound, one stream for
    TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t5x_like import storage
    from t5x_like.reporting import metrics
    log_url = f"gs://{BUCKET}/files/logs/train.log"
    for text in ("first run\n", "second run\n"):
        f = storage.AppendableFile(log_url, min_flush_interval_s=3600)
        f.write(text)
        f.flush()                       # inside the interval: not yet written
        f.close()                       # always written
    assert storage.read_text(log_url) == "first run\nsecond run\n"

    monkeypatch.setattr(metrics, "EVENTS_PER_REMOTE_FILE", 4)
    writer = metrics.TensorBoardWriter(logdir=f"gs://{BUCKET}/files/train")
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": 10.0 - step, "accuracy": step / 10})
    writer.close()
    names = storage.list_dir(f"gs://{BUCKET}/files/train")
    assert len(names) == 3 and all(n.startswith("events.out.tfevents.") for n in names)
    accumulator = EventAccumulator(download(f"gs://{BUCKET}/files/train",
                                            str(tmp_path / "events")))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
        (s, 10.0 - s) for s in range(1, 6)]


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_in_the_bucket(emulator, tmp_path):
    """2 processes x 4 devices, MODEL_DIR in the bucket: one checkpoint holding both
    processes' arrays and both data shards, equal to a 1-process run on disk, which
    it then resumes in one process."""
    from test_multiprocess import free_port
    from t5x_like import storage
    model_dir = f"gs://{BUCKET}/two_processes"
    port = free_port()
    procs = [subprocess.Popen(
        train_command(model_dir, "--gin.TRAIN_STEPS=2", "--num_cpu_devices=4",
                      "--num_processes=2", f"--process_id={i}",
                      f"--coordinator_address=127.0.0.1:{port}"),
        cwd=REPO, env=env_with(emulator), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert committed(model_dir) == [1, 2]
    assert storage.list_dir(f"{model_dir}/checkpoints/2/data_positions")[-2:] == [
        "shard_00000_of_00002.position", "shard_00001_of_00002.position"]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(
        storage.list_dir(f"{model_dir}/checkpoints/2/state"))
    local = str(tmp_path / "local")
    run(train_command(local, "--gin.TRAIN_STEPS=3", "--num_cpu_devices=8"), emulator)
    resumed = run(train_command(model_dir, "--gin.TRAIN_STEPS=3", "--num_cpu_devices=8"),
                  emulator)
    assert "Resumed from checkpoint at step 2" in resumed
    assert "Data shards [0, 1] continue from their saved positions" in resumed
    events = download(f"{model_dir}/train", str(tmp_path / "bucket" / "train"))
    assert len(os.listdir(events)) == 2
    bucket_losses = logged_losses(str(tmp_path / "bucket"))
    local_losses = logged_losses(local)
    np.testing.assert_allclose([bucket_losses[s] for s in (1, 2, 3)],
                               [local_losses[s] for s in (1, 2, 3)], rtol=1e-6)


def test_a_hugging_face_directory_in_the_bucket_imports_as_from_disk(emulator, tmp_path):
    """A Hugging Face export written straight into a bucket is byte-equal to one on
    disk, and PRETRAINED_DIR / --hf_checkpoint there reads config, tensors (bf16 too,
    by byte ranges) and tokenizer equal to the same directory on disk."""
    import flax.linen as nn
    import ml_dtypes

    from t5x_like import storage
    from t5x_like.hf import llama, safetensors_io, tokenizer
    from t5x_like.models import decoder
    config = decoder.DecoderConfig(vocab_size=8192, emb_dim=32, num_heads=4, num_kv_heads=2,
                                   head_dim=8, mlp_dim=64, num_layers=2,
                                   max_position_embeddings=128)
    params = nn.unbox(decoder.DecoderOnlyModel(config=config).init_params(
        jax.random.key(3), batch_size=1, decoder_length=4))
    local = str(tmp_path / "hf")
    llama.export_checkpoint(params, config, local, dtype=ml_dtypes.bfloat16)
    with open(os.path.join(REPO, "data", "vocab", "pydocs_8k.model"), "rb") as f:
        vocab = f.read()
    with open(os.path.join(local, "tokenizer.model"), "wb") as f:
        f.write(vocab)
    url = f"gs://{BUCKET}/hf_llama"
    llama.export_checkpoint(params, config, url, dtype=ml_dtypes.bfloat16)   # straight there
    storage.path(url, "tokenizer.model").write_bytes(vocab)
    assert sorted(storage.list_dir(url)) == sorted(os.listdir(local))
    for name in os.listdir(local):      # the export writes the same bytes to either place
        with open(os.path.join(local, name), "rb") as f:
            assert storage.path(url, name).read_bytes() == f.read(), name

    reader = safetensors_io.SafetensorsReader(url)
    assert reader.keys() == safetensors_io.SafetensorsReader(local).keys()
    embed = reader.get("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(embed, safetensors_io.SafetensorsReader(local).get(
        "model.embed_tokens.weight"))
    from_bucket, from_disk = llama.import_checkpoint(url), llama.import_checkpoint(local)
    assert from_bucket[0] == from_disk[0]
    jax.tree.map(np.testing.assert_array_equal, from_bucket[1], from_disk[1])
    text = "Raises ValueError when the list is empty."
    assert tokenizer.load(url).encode(text) == tokenizer.load(local).encode(text)


def test_a_corrupt_checkpoint_in_the_bucket_is_set_aside_there(emulator, tmp_path):
    """Object stores cannot rename a folder: quarantine copies the step's objects to
    checkpoints.corrupt/ in the bucket, deletes them, and the previous step restores."""
    from test_checkpoint_recovery import layout_for, make_state

    from t5x_like import storage
    from t5x_like.checkpointing import checkpoints
    from t5x_like.parallel import partitioning
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
    state, layout = make_state(partitioner, seed=1)
    directory = f"gs://{BUCKET}/quarantine/checkpoints"
    ckpt = checkpoints.Checkpointer(directory=directory, async_save=False)
    for step in (1, 2):
        ckpt.save(step, state, data_position={"step": step})
    ckpt.close()
    manifest = storage.path(directory, "2", "state", "_METADATA")
    manifest.write_bytes(manifest.read_bytes()[:20])                 # truncated
    ckpt = checkpoints.Checkpointer(directory=directory)
    step, restored, _ = ckpt.restore_latest(
        abstract_state=layout_for(partitioner).abstract_with_shardings())
    ckpt.close()
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert checkpoints.committed_steps(directory) == [1]
    [aside] = storage.list_dir(f"{directory}.corrupt")
    assert aside.startswith("2-")
    assert "_METADATA" in storage.list_dir(f"{directory}.corrupt/{aside}/state")
