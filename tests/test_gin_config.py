"""Bad gin input fails before any work, with a message naming the culprit."""

import pytest

from launch import train as launch_train
from t5x_like.config import gin_config


@pytest.fixture(autouse=True)
def clean_gin():
    gin_config.reset()
    yield
    gin_config.reset()


def parse(*bindings, files=("configs/base.gin",)):
    gin_config.parse(gin_files=list(files), gin_bindings=list(bindings))


def test_base_config_parses():
    parse()


def test_unknown_parameter_is_named():
    with pytest.raises(gin_config.GinConfigError, match="bogus_steps"):
        parse("train_loop.train.bogus_steps = 3")


def test_unknown_configurable_is_named():
    with pytest.raises(gin_config.GinConfigError, match="optimizers.lion"):
        parse("optimizers.lion.learning_rate = 0.1")


def test_missing_required_macro_is_named():
    files = ("configs/runs/pretrain.gin", "configs/models/t5_1_1_tiny.gin",
             "configs/partitioning/data_parallel.gin")
    with pytest.raises(gin_config.GinConfigError, match="MODEL_DIR is %gin.REQUIRED"):
        parse("MIXTURE_OR_TASK_NAME='x'", "TASK_FEATURE_LENGTHS={}", "TRAIN_STEPS=1",
              files=files)


def test_missing_gin_file_is_named():
    with pytest.raises(gin_config.GinConfigError, match="configs/nope.gin"):
        parse(files=("configs/nope.gin",))


def test_cli_shorthand_and_exit_message(capsys):
    args, bindings = launch_train.parse_flags(
        ["--gin_file=a.gin", "--gin.TRAIN_STEPS=7", "--gin_bindings=BATCH_SIZE=4"])
    assert args.gin_file == ["a.gin"] and bindings == ["BATCH_SIZE=4", "TRAIN_STEPS=7"]
    with pytest.raises(SystemExit) as exit_info:
        launch_train.main(["--gin_file=configs/base.gin", "--gin.train_loop.train.nope=1"])
    assert "nope" in str(exit_info.value) and str(exit_info.value).startswith("error:")


@pytest.mark.parametrize("old_import, new_import", [
    ("from t5x_like import train as train_lib",
     "from t5x_like.training import train_loop"),
    ("from t5x_like import partitioning", "from t5x_like.parallel import partitioning"),
    ("from t5x_like.predictions import Decoded",
     "from t5x_like.evaluation import predictions"),
])
def test_a_module_moved_by_the_regroup_names_its_new_import(tmp_path, old_import,
                                                            new_import):
    user_file = tmp_path / "mine.gin"
    user_file.write_text(f"from __gin__ import dynamic_registration\n{old_import}\n")
    with pytest.raises(gin_config.GinConfigError) as raised:
        parse(files=("configs/base.gin", str(user_file)))
    assert str(raised.value).count("\n") == 0 and new_import in raised.value.fix


@pytest.mark.parametrize("old, new", [("train_lib.train", "train_loop.train"),
                                      ("checkpoints.InitFrom", "init_from.InitFrom"),
                                      ("decoding.DecodeConfig", "decode.DecodeConfig")])
def test_an_old_gin_name_names_the_new_one(old, new):
    with pytest.raises(gin_config.GinConfigError, match=f"old gin name {old}") as raised:
        parse(f"{old}.some_setting = 3")
    assert new in raised.value.fix


def test_the_launcher_says_when_no_gin_file_configures_the_training_loop(tmp_path):
    user_file = tmp_path / "lonely.gin"
    user_file.write_text("from __gin__ import dynamic_registration\n"
                         "from t5x_like.training import optimizers\n")
    with pytest.raises(SystemExit) as exited:
        launch_train.main([f"--gin_file={user_file}"])
    assert str(exited.value).startswith("error: the gin files configure no train_loop.train")
