"""Never lose a run: corrupt/incomplete checkpoints, resharded restores, init_from."""

import glob
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch_helpers import overwrite_bytes_in_largest_array_file, read_only
from t5x_like.checkpointing import checkpoints
from t5x_like.checkpointing import init_from as init_from_lib
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.models import t5

FEATURE_LENGTHS = {"encoder_input_tokens": 16, "decoder_target_tokens": 8}


def tiny(layers=2, **overrides):
    config = dict(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=layers, num_decoder_layers=2)
    return t5.EncoderDecoderModel(config=t5.T5Config(**{**config, **overrides}))


OPTIMIZER = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())


def layout_for(partitioner, model=None):
    """Shapes and shardings only: no compilation, no arrays."""
    return trainer.state_layout(model=model or tiny(), optimizer=OPTIMIZER,
                                partitioner=partitioner, feature_lengths=FEATURE_LENGTHS)


def make_state(partitioner, model=None, seed=0):
    layout = layout_for(partitioner, model)
    state = trainer.init_train_state(model=model or tiny(), optimizer=OPTIMIZER,
                                     partitioner=partitioner, feature_lengths=FEATURE_LENGTHS,
                                     seed=seed, layout=layout)
    return state, layout


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(directory, state, steps, **kwargs):
    ckpt = checkpoints.Checkpointer(directory=directory, **kwargs)
    for step in steps:
        ckpt.save(step, state, data_position={"step": step})
    ckpt.close()


@pytest.fixture(scope="module")
def one_device():
    return partitioning.Partitioner(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def source(one_device):
    """A real train state of the tiny model, shared by the tests that only read it."""
    return make_state(one_device, seed=1)


def test_corrupt_latest_is_set_aside_and_previous_used(tmp_path, source, caplog):
    state, layout = source
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, state, [1, 2, 3])
    # Truncate the array data of step 3, as a crash of the storage layer would.
    data_files = [f for f in glob.glob(f"{directory}/3/state/**/*", recursive=True)
                  if os.path.isfile(f) and os.path.getsize(f) > 1000]
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(100)
    # And a crash mid-write of step 4: Orbax's temporary directory, never renamed.
    os.makedirs(f"{directory}/4.orbax-checkpoint-tmp-1234/state")

    ckpt = checkpoints.Checkpointer(directory=directory)
    with caplog.at_level(logging.WARNING):
        step, restored, data_position = ckpt.restore_latest(
            abstract_state=layout.abstract_with_shardings())
    assert step == 2 and data_position == {"step": 2}
    assert "Checkpoint step 3" in caplog.text and "unreadable" in caplog.text
    assert_trees_equal(restored, state)
    assert ckpt.all_steps() == [1, 2]                       # nothing valid deleted
    assert os.listdir(f"{directory}.corrupt")[0].startswith("3-")   # set aside, kept
    ckpt.close()


def test_flipped_bytes_are_caught_set_aside_and_previous_used(tmp_path, source, caplog):
    state, layout = source
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, state, [1, 2])
    overwrite_bytes_in_largest_array_file(f"{directory}/2")

    ckpt = checkpoints.Checkpointer(directory=directory)
    with caplog.at_level(logging.WARNING):
        step, restored, _ = ckpt.restore_latest(abstract_state=layout.abstract_with_shardings())
    assert step == 1
    assert "Checkpoint step 2" in caplog.text and "corrupt" in caplog.text
    assert_trees_equal(restored, state)
    assert ckpt.all_steps() == [1]
    assert os.listdir(f"{directory}.corrupt")[0].startswith("2-")
    ckpt.close()


def test_checkpoint_of_another_config_is_an_error_not_skipped(tmp_path, source, one_device):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, source[0], [1])
    other_layout = layout_for(one_device, model=tiny(mlp_dim=128))
    ckpt = checkpoints.Checkpointer(directory=directory)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"mlp/wi_0/kernel"):
        ckpt.restore_latest(abstract_state=other_layout.abstract_with_shardings())
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_keeps_latest_k_plus_every_mth(tmp_path):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, {"x": jnp.ones((2,))}, range(1, 8), max_to_keep=2, keep_period=3)
    assert checkpoints.Checkpointer(directory=directory).all_steps() == [3, 6, 7]


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
    """A state saved from a 4x2 (fsdp x model) mesh of 8 devices."""
    directory = str(tmp_path_factory.mktemp("reshard") / "checkpoints")
    saver = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=4,
                                     tensor_parallelism=2)
    state, _ = make_state(saver)
    save_steps(directory, state, [7])
    return directory, state


@pytest.mark.parametrize("num_devices,fsdp,model", [(4, 2, 2), (1, 1, 1)])
def test_restore_onto_a_different_mesh(saved_on_8_devices, num_devices, fsdp, model):
    directory, state = saved_on_8_devices
    target = partitioning.Partitioner(data_parallelism=1, fsdp_parallelism=fsdp,
                                      tensor_parallelism=model,
                                      devices=jax.devices()[:num_devices])
    layout = layout_for(target)
    step, restored, _ = checkpoints.Checkpointer(directory=directory).restore_latest(
        abstract_state=layout.abstract_with_shardings())
    assert step == 7
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(layout.shardings)):
        assert leaf.sharding == sharding and len(leaf.sharding.device_set) == num_devices
    assert_trees_equal(restored, state)


def test_init_from_params_only_with_rename_and_dtype_cast(tmp_path, source, one_device):
    directory = str(tmp_path / "checkpoints")
    bf16 = source[0].replace(
        params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), source[0].params))
    save_steps(directory, bf16, [5])

    # A deeper encoder: its extra layer is seeded from the checkpoint's last layer.
    fresh, layout = make_state(one_device, model=tiny(layers=3), seed=2)
    abstract = layout.abstract_with_shardings().params
    with pytest.raises(checkpoints.CheckpointMismatchError, match="encoder/layers_2"):
        init_from_lib.restore_params_from(init_from_lib.InitFrom(directory=directory),
                                        abstract_params=abstract, fresh_params=fresh.params)
    params = init_from_lib.restore_params_from(
        init_from_lib.InitFrom(directory=directory,
                             rename=((r"encoder/layers_2/(.*)", r"encoder/layers_1/\1"),)),
        abstract_params=abstract, fresh_params=fresh.params)
    want = bf16.params
    np.testing.assert_array_equal(
        params["encoder"]["layers_2"]["mlp"]["wo"]["kernel"],
        np.asarray(want["encoder"]["layers_1"]["mlp"]["wo"]["kernel"], np.float32))
    assert params["decoder"]["logits_dense"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(params["token_embedder"]["embedding"],
                                  np.asarray(want["token_embedder"]["embedding"], np.float32))

    # Non-strict: the missing layer keeps its fresh initialisation.
    loose = init_from_lib.restore_params_from(
        init_from_lib.InitFrom(directory=directory, strict=False),
        abstract_params=abstract, fresh_params=fresh.params)
    assert_trees_equal(loose["encoder"]["layers_2"], fresh.params["encoder"]["layers_2"])


WRITE_FAILURE = r'''
import resource, signal, sys, time
import jax, jax.numpy as jnp
from t5x_like.checkpointing import checkpoints
directory, how = sys.argv[1:]
state = {"w": jnp.arange(4 * 1024 * 1024, dtype=jnp.float32)}     # 16 MB
ckpt = checkpoints.Checkpointer(directory=directory)
ckpt.save(1, {"w": jnp.ones((8,))}, data_position={"step": 1})
ckpt.wait_until_finished()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                      # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))  # "disk full"
try:
    ckpt.save(2, state, data_position={"step": 2})
    if how == "wait":
        ckpt.wait_until_finished()
    else:                 # what train() does after every step: no wait, no further save
        deadline = time.time() + 60
        while time.time() < deadline:
            ckpt.raise_if_save_failed()
            time.sleep(0.05)
except checkpoints.CheckpointWriteError as e:
    print("ERROR:", e)
'''


@pytest.mark.parametrize("how", ["wait", "poll"])
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous(tmp_path, how):
    """The write of step 2 fails in the background; the error names step 2, whether
    the caller waits for the save or polls for its failure after each step."""
    directory = str(tmp_path / "checkpoints")
    proc = subprocess.run([sys.executable, "-c", WRITE_FAILURE, directory, how],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "ERROR: Writing the checkpoint for step 2" in proc.stdout, proc.stderr[-3000:]
    assert "step 1, intact" in proc.stdout
    ckpt = checkpoints.Checkpointer(directory=directory)
    assert ckpt.all_steps() == [1]
    restored, _ = ckpt.restore(1, abstract_state={"w": jax.ShapeDtypeStruct((8,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.ones(8))


UNWRITABLE_AT_SAVE = r'''
import sys, time
import jax.numpy as jnp
from t5x_like.checkpointing import checkpoints
ckpt = checkpoints.Checkpointer(directory=sys.argv[1])
ckpt.save(1, {"w": jnp.ones((8,))}, data_position={"step": 1})
ckpt.wait_until_finished()
print("READY", flush=True)
sys.stdin.readline()                       # the test makes the directory read-only now
start = time.time()
try:
    ckpt.save(2, {"w": jnp.ones((8,))}, data_position={"step": 2})
    ckpt.wait_until_finished()
except checkpoints.CheckpointWriteError as e:
    print(f"ERROR after {time.time() - start:.0f} s:", e, flush=True)
'''


def test_a_directory_that_turns_read_only_fails_the_save_at_once(tmp_path):
    """Orbax created step directories in a background thread: when that failed, the
    other writer threads waited 5 minutes for the directory, and the process hung."""
    directory = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", UNWRITABLE_AT_SAVE, str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "READY"
        with read_only(str(directory)):
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR after 0 s: Writing the checkpoint for step 2" in out, out[-3000:]
    assert "step 1, intact" in out
    assert checkpoints.committed_steps(str(directory)) == [1]
