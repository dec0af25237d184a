"""Every test runs on CPU with 8 fake devices, so meshes of up to 8 work anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
