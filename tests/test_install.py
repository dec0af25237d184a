"""A non-editable install (`pip install .` into a fresh venv) trains from any directory.

The package is installed from a clean copy of the repository's tracked files; its
dependencies (TensorFlow, JAX, ...) are taken from this interpreter's site-packages
through a .pth file rather than installed again, so the test checks what the
package ships (modules, configs, vocabulary, entry points), not pip's downloads.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from launch_helpers import REPO, logged_losses

pytestmark = pytest.mark.slow

CORPUS = [f"Document {i}: the quick brown fox jumps over the lazy dog, and the "
          f"interpreter evaluates expression number {i} before returning a value."
          for i in range(300)]

RUN_GIN = """\
from __gin__ import dynamic_registration
from t5x_like.data import user_tasks

include 'configs/runs/cpu_pretrain.gin'

MODEL_DIR = '{model_dir}'
TRAIN_STEPS = 2
MIXTURE_OR_TASK_NAME = @user_tasks.register_text_task()
user_tasks.register_text_task:
  name = 'my_corpus'
  patterns = '{corpus}'
  objective = 'span_corruption'
"""


def _clean_copy(destination):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source, target = os.path.join(REPO, name), os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isfile(source):
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout to copy the tracked files from")
    root = tmp_path_factory.mktemp("install")
    _clean_copy(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q",
                          str(root / "src")], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    # This interpreter's dependencies, after the venv's own packages on sys.path.
    with open(os.path.join(site.stdout.strip(), "zz_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv, args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": ""}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_installed_copy_registers_a_user_task_and_trains_the_default_run(installed,
                                                                         tmp_path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    (workdir / "my_run.gin").write_text(RUN_GIN.format(
        model_dir=workdir / "run", corpus=workdir / "corpus.txt"))

    where = _run(installed, [str(installed / "bin" / "python"), "-c",
                             "import t5x_like.data.vocabularies as v; print(v.__file__); "
                             "print(v.BUNDLED_SENTENCEPIECE)"], cwd=workdir)
    module, vocab = where.stdout.split()
    assert module.startswith(str(installed)) and not module.startswith(REPO), where.stderr
    assert vocab.startswith(str(installed)) and os.path.isfile(vocab)
    assert not os.path.islink(vocab)                # a real file, not a link to the repo

    proc = _run(installed, [str(installed / "bin" / "t5x_like-train"),
                            "--gin_file=my_run.gin"], cwd=workdir)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "step 2/2 | loss" in log
    losses = logged_losses(str(workdir / "run"))
    assert sorted(losses) == [2] and 7.0 < losses[2] < 10.0     # logged at the last step

    # The bundled pydocs run needs the repository's data/ folder: a clear error.
    proc = _run(installed, [str(installed / "bin" / "t5x_like-train"),
                            "--gin_file=configs/base.gin"], cwd=workdir)
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "run from a checkout" in proc.stderr, proc.stderr
