"""Run `launch.train` on every worker of a Cloud TPU VM slice (or several slices).

  python -m launch.tpu_vm --tpu=my-v5p --zone=us-east5-a --project=my-proj \
      --accelerator_type=v5p-128 up        # create the TPU VM (skip if it exists)
  python -m launch.tpu_vm ... start -- --gin_file=configs/base.gin --gin.MODEL_DIR="'gs://b/run'"
  python -m launch.tpu_vm ... logs | status | stop | down

`start` packs this checkout, copies it to every worker (`gcloud compute tpus tpu-vm
scp --worker=all`), installs it with the TPU extra, starts the same `python -m
launch.train ... --distributed=auto` detached on all workers, then streams worker
0's log until its process ends and reports which workers failed. `stop` sends
SIGTERM (the trainer saves a checkpoint and exits). `--num_slices=N` runs on N
slices named TPU-0..TPU-(N-1) (a queued resource's node prefix), joined over DCN
through the MEGASCALE_* variables. `--dry_run` prints every command, runs none.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from t5x_like.parallel import topologies

REMOTE_DIR = "~/t5x_like"
VENV = "~/t5x_like_venv"
LOG, PID, EXIT = "~/t5x_like_run.log", "~/t5x_like_run.pid", "~/t5x_like_run.exit"
TARBALL = "/tmp/t5x_like_code.tgz"
MEGASCALE_PORT = 8080


def parse_flags(argv: list[str]) -> argparse.Namespace:
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "start", "logs", "status", "stop", "down"])
    p.add_argument("--tpu", required=True, help="TPU VM name (node prefix if multi-slice).")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--accelerator_type", required=True, help="e.g. v5p-128, v4-64, v5litepod-16")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--runtime_version", default="v2-alpha-tpuv5",
                   help="TPU VM image for `up` (see the Cloud TPU docs for your chip).")
    p.add_argument("--spot", action="store_true", help="`up`: a preemptible Spot TPU.")
    p.add_argument("--extras", default="tpu,data", help="pip extras installed on workers.")
    p.add_argument("--no_follow", action="store_true", help="`start`: do not stream logs.")
    p.add_argument("--dry_run", action="store_true", help="Print the commands only.")
    args = p.parse_args(argv)
    args.train_args = train_args
    args.slice = topologies.parse(args.accelerator_type, num_slices=args.num_slices)
    if args.action == "start" and not train_args:
        p.error("start needs the training flags after `--`, e.g. -- --gin_file=configs/base.gin")
    return args


# --------------------------------------------------------------------------- commands

def slice_names(args) -> list[str]:
    if args.num_slices == 1:
        return [args.tpu]
    return [f"{args.tpu}-{i}" for i in range(args.num_slices)]


def _where(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def ssh(args, name: str, worker: str | int, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *_where(args),
            f"--worker={worker}", f"--command={command}"]


def up_commands(args) -> list[list[str]]:
    spot = ["--spot"] if args.spot else []
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", name, *_where(args),
             f"--accelerator-type={args.accelerator_type}",
             f"--version={args.runtime_version}", *spot] for name in slice_names(args)]


def down_commands(args) -> list[list[str]]:
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *_where(args), "--quiet"]
            for name in slice_names(args)]


def sync_commands(args) -> list[list[str]]:
    """Pack the checkout (no .git, venvs, runs), copy and unpack it on every worker,
    and install it with the TPU extra."""
    pack = ["tar", "czf", TARBALL, "--exclude=./.git", "--exclude=./.venv",
            "--exclude=./runs", "--exclude=__pycache__", "-C", ".", "."]
    install = (f"mkdir -p {REMOTE_DIR} && tar xzf {TARBALL} -C {REMOTE_DIR} && "
               f"(test -d {VENV} || python3 -m venv {VENV}) && "
               f"cd {REMOTE_DIR} && {VENV}/bin/pip install -q -e '.[{args.extras}]'")
    out = [pack]
    for name in slice_names(args):
        out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL,
                    f"{name}:{TARBALL}", *_where(args), "--worker=all"])
        out.append(ssh(args, name, "all", install))
    return out


def megascale_env(args, slice_id: int, coordinator: str) -> str:
    if args.num_slices == 1:
        return ""
    return (f"MEGASCALE_COORDINATOR_ADDRESS={coordinator}:{MEGASCALE_PORT} "
            f"MEGASCALE_NUM_SLICES={args.num_slices} MEGASCALE_SLICE_ID={slice_id} "
            f"MEGASCALE_PORT={MEGASCALE_PORT} ")


def coordinator_command(args) -> list[str]:
    """Asks for the internal IP of slice 0's worker 0 (the DCN coordinator)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", slice_names(args)[0],
            *_where(args), "--format=value(networkEndpoints[0].ipAddress)"]


def start_commands(args, coordinator: str = "SLICE0_WORKER0_IP") -> list[list[str]]:
    """Detached on every worker: the run's exit status lands in EXIT, its pid in PID."""
    slices = ([f"--gin.partitioning.Partitioner.num_slices={args.num_slices}"]
              if args.num_slices > 1 else [])
    train = f"{VENV}/bin/python " + shlex.join(
        ["-m", "launch.train", *args.train_args, *slices, "--distributed=auto"])
    out = []
    for slice_id, name in enumerate(slice_names(args)):
        env = megascale_env(args, slice_id, coordinator)
        body = (f"cd {REMOTE_DIR} && {env}{train}"
                f" > {LOG} 2>&1; echo $? > {EXIT}")
        out.append(ssh(args, name, "all",
                       f"rm -f {EXIT}; setsid nohup bash -c {shlex.quote(body)} "
                       f"> /dev/null 2>&1 < /dev/null & echo $! > {PID}"))
    return out


def logs_command(args) -> list[str]:
    """Worker 0's log, followed until its training process ends."""
    return ssh(args, slice_names(args)[0], 0,
               f"tail --pid=$(cat {PID}) -n +1 -F {LOG}")


def status_commands(args) -> list[tuple[str, int, list[str]]]:
    probe = (f"if test -f {EXIT}; then echo exit $(cat {EXIT}); "
             f"elif kill -0 $(cat {PID} 2>/dev/null) 2>/dev/null; then echo running; "
             "else echo missing; fi")
    return [(name, w, ssh(args, name, w, probe)) for name in slice_names(args)
            for w in range(args.slice.hosts_per_slice)]


def stop_commands(args) -> list[list[str]]:
    # SIGTERM to the run's process group: the trainer checkpoints and exits.
    return [ssh(args, name, "all", f"kill -TERM -- -$(cat {PID}) 2>/dev/null || true")
            for name in slice_names(args)]


# --------------------------------------------------------------------------- running

def _run(args, cmd: list[str], *, capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return subprocess.CompletedProcess(cmd, 0, stdout="")
    return subprocess.run(cmd, check=False, text=True, capture_output=capture)


def report_status(args) -> int:
    """Prints each worker's state; returns how many failed (exit != 0 or gone)."""
    failed = []
    for name, worker, cmd in status_commands(args):
        state = _run(args, cmd, capture=True).stdout.strip() or "unreachable"
        if not args.dry_run:
            print(f"{name} worker {worker}: {state}")
            if state not in ("running", "exit 0"):
                failed.append(f"{name}/{worker}")
    if failed:
        print(f"FAILED workers: {', '.join(failed)} (see {LOG} on each)")
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    print(f"# {args.slice}: {args.slice.hosts_per_slice} worker(s) per slice", flush=True)
    if args.action in ("up", "down"):
        cmds = up_commands(args) if args.action == "up" else down_commands(args)
        return max((_run(args, c).returncode for c in cmds), default=0)
    if args.action == "stop":
        return max(_run(args, c).returncode for c in stop_commands(args))
    if args.action == "status":
        return 1 if report_status(args) else 0
    if args.action == "start":
        for cmd in sync_commands(args):
            if _run(args, cmd).returncode:
                return 1
        coordinator = "SLICE0_WORKER0_IP"
        if args.num_slices > 1:
            found = _run(args, coordinator_command(args), capture=True).stdout.strip()
            coordinator = found or coordinator
        for cmd in start_commands(args, coordinator):
            if _run(args, cmd).returncode:
                return 1
        if args.no_follow:
            return 0
    _run(args, logs_command(args))
    return 1 if report_status(args) else 0


if __name__ == "__main__":
    sys.exit(main())
