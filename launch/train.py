"""Train a model: `python -m launch.train --gin_file=configs/base.gin [--gin.NAME=VALUE ...]`.

Flags pick gin files and bindings and, for multi-host runs, the JAX coordinator;
everything else is gin. The run itself is `t5x_like.train.train`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import gin


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from t5x_like.gin_config import split_gin_shorthand
    argv, shorthand = split_gin_shorthand(argv)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gin_file", action="append", default=[], help="Repeatable.")
    p.add_argument("--gin_bindings", action="append", default=[], help="Repeatable.")
    p.add_argument("--gin_search_paths", action="append", default=[],
                   help="Extra folders in which gin files and includes are looked up.")
    p.add_argument("--coordinator_address", help="host:port of process 0 (multi-host).")
    p.add_argument("--num_processes", type=int, help="Total JAX processes (multi-host).")
    p.add_argument("--process_id", type=int, help="This process's index (multi-host).")
    p.add_argument("--heartbeat_timeout_seconds", type=int, default=100,
                   help="A process silent this long is declared dead; the others exit.")
    p.add_argument("--distributed", choices=["auto", "off"], default="off",
                   help="auto: jax.distributed.initialize() detects the cluster (Cloud "
                   "TPU VM, SLURM, Open MPI); explicit coordinator flags win.")
    p.add_argument("--num_cpu_devices", type=int,
                   help="Simulate this many CPU devices (testing sharding on a laptop).")
    args = p.parse_args(argv)
    return args, args.gin_bindings + shorthand


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s] %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import jax
    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
    if args.num_processes and args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout_seconds)
    elif args.distributed == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout_seconds)

    from t5x_like import gin_config
    from t5x_like import train as train_lib
    try:
        gin_config.parse(gin_files=args.gin_file, gin_bindings=bindings,
                         search_paths=args.gin_search_paths)
    except gin_config.GinConfigError as e:
        sys.exit(f"error: {e}")
    gin.get_configurable(train_lib.train)()


if __name__ == "__main__":
    main()
