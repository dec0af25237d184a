"""TPU VM launcher (dry run: checks the gcloud commands offline), cluster detection in
launch.train, and the SLURM template."""

import os
import shlex
import subprocess
import sys

import pytest

from launch import tpu_vm

BASE = ["--tpu=pod", "--zone=us-east5-a", "--project=proj", "--dry_run"]
TRAIN = ["--", "--gin_file=configs/base.gin", "--gin.MODEL_DIR='gs://bucket/run'"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_real_commands(monkeypatch):
    real_run = subprocess.run

    def refuse_gcloud(cmd, *args, **kwargs):
        if cmd[0] in ("gcloud", "tar"):
            raise AssertionError(f"dry run executed {cmd}")
        return real_run(cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess, "run", refuse_gcloud)


def _commands(capsys, argv):
    assert tpu_vm.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


def test_start_syncs_installs_runs_on_all_workers_then_follows_worker0(capsys):
    cmds = _commands(capsys, BASE + ["--accelerator_type=v5p-128", "start"] + TRAIN)
    assert cmds[0][:2] == ["tar", "czf"]
    scp, install, start, logs, *status = cmds[1:]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "--zone=us-east5-a" in scp and "--project=proj" in scp
    assert "--worker=all" in install and "pip install" in _flag(install, "command")
    assert "[tpu,data]" in _flag(install, "command")
    remote = _flag(start, "command")
    assert "--worker=all" in start and "setsid nohup" in remote
    inner = shlex.split(shlex.split(remote.split("bash -c ", 1)[1])[0])
    assert inner[inner.index("-m") + 1:inner.index(">")] == [
        "launch.train", "--gin_file=configs/base.gin", "--gin.MODEL_DIR='gs://bucket/run'",
        "--distributed=auto"]
    assert "--worker=0" in logs and "tail --pid" in _flag(logs, "command")
    # v5p-128 = 64 chips on 16 hosts: status asks each worker.
    assert [_flag(c, "worker") for c in status] == [str(i) for i in range(16)]


def test_multislice_start_sets_megascale_env_and_the_dcn_axis(capsys):
    cmds = _commands(capsys, BASE + ["--accelerator_type=v5litepod-16", "--num_slices=2",
                                     "--no_follow", "start"] + TRAIN)
    starts = [c for c in cmds if "setsid" in " ".join(c)]
    assert [c[5] for c in starts] == ["pod-0", "pod-1"]
    for slice_id, cmd in enumerate(starts):
        remote = _flag(cmd, "command")
        assert f"MEGASCALE_SLICE_ID={slice_id}" in remote
        assert "MEGASCALE_NUM_SLICES=2" in remote
        assert "Partitioner.num_slices=2" in remote
    assert any(c[4] == "describe" and c[5] == "pod-0" for c in cmds)


def test_up_stop_down(capsys):
    (up,) = _commands(capsys, BASE + ["--accelerator_type=v4-64", "--spot", "up"])
    assert up[4:6] == ["create", "pod"] and "--accelerator-type=v4-64" in up and "--spot" in up
    (stop,) = _commands(capsys, BASE + ["--accelerator_type=v4-64", "stop"])
    assert "--worker=all" in stop and "kill -TERM" in _flag(stop, "command")
    (down,) = _commands(capsys, BASE + ["--accelerator_type=v4-64", "down"])
    assert down[4:6] == ["delete", "pod"]


def test_start_without_training_flags_and_bad_type_are_errors(capsys):
    with pytest.raises(SystemExit):
        tpu_vm.main(BASE + ["--accelerator_type=v5p-128", "start"])
    with pytest.raises(ValueError, match="v5p-100"):
        tpu_vm.main(BASE + ["--accelerator_type=v5p-100", "logs"])


def test_launch_train_auto_detects_the_cluster(monkeypatch):
    import jax
    from launch import train as train_launcher
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *a, **kw: calls.append((a, kw)))
    with pytest.raises(SystemExit, match="gin_file"):     # stops at gin, after init
        train_launcher.main(["--distributed=auto"])
    (args, kwargs), = calls
    assert args == () and "coordinator_address" not in kwargs
    calls.clear()
    with pytest.raises(SystemExit):
        train_launcher.main([])                           # default: single process
    assert calls == []


def test_slurm_template_is_valid_bash_and_its_xla_flags_parse():
    script = os.path.join(ROOT, "launch", "slurm", "train_gpu.sbatch")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    assert "launch.train --distributed=auto" in text
    flags = [line.strip() for line in text.split("XLA_FLAGS_THROUGHPUT=(")[1]
             .split(")")[0].splitlines() if line.strip().startswith("--xla")]
    assert len(flags) >= 5
    # XLA aborts on a flag it does not know: check every one with this jaxlib.
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
                   check=True, env=env, capture_output=True)
