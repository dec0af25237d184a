"""Every test runs on CPU with 8 fake devices, so meshes of up to 8 work anywhere.

The session shares one persistent compilation cache (a fresh folder, removed at
exit), inherited by the launcher subprocesses: many tests train the same tiny
config, and each process would otherwise compile the same step again. The cache
key holds the program, the devices and the compiler flags, so a hit runs the very
executable a compile would have produced (benchmarks/RESULTS.md, "Test suite").
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="t5x_like-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """6 steps of tests/configs/tiny_run.gin in one go: what every interrupted and
    resumed run must reproduce exactly."""
    from launch_helpers import run_train
    model_dir = str(tmp_path_factory.mktemp("straight"))
    run_train(model_dir, "--gin.TRAIN_STEPS=6")
    return model_dir


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """straight_run's 6 steps with in-loop eval on: (model_dir, log)."""
    from launch_helpers import EVAL_ON, run_train
    model_dir = str(tmp_path_factory.mktemp("eval_on"))
    return model_dir, run_train(model_dir, "--gin.TRAIN_STEPS=6", *EVAL_ON)
