"""What every entry point shares: one flag block, quiet output, gin, JAX processes.

`launch/train.py` and `launch/compile.py` (and any later entry point) build their
parser with `flag_parser`, which already holds the gin flags and `--verbosity`, add
only their own flags, and call `parse_flags`, `configure_output` and `parse_gin`.

Quiet by default: a run prints our own lines only. TensorFlow's C++ notices (a
cuInit error, tf.data's cache warning on every start) obey TF_CPP_MIN_LOG_LEVEL,
which `configure_output` sets before anything imports TensorFlow; the ones printed
while its libraries load (oneDNN, "Could not find cuda drivers") come before any log
level applies, so `parse_gin`, where gin files import the data layer, runs with the
process's native stderr sent to /dev/null. `--verbosity=1` shows library warnings
and INFO logs, TF's warnings and tracebacks with errors; `--verbosity=2` everything.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from t5x_like import gin_config

# --verbosity -> (TF_CPP_MIN_LOG_LEVEL, level of library loggers).
_VERBOSITY = {0: ("3", logging.ERROR), 1: ("1", logging.INFO), 2: ("0", logging.DEBUG)}
_LIBRARY_LOGGERS = ("absl", "orbax", "jax", "tensorflow", "seqio", "etils")


def flag_parser(description: str, *, prog: str) -> argparse.ArgumentParser:
    """An ArgumentParser that already holds the shared flags (gin, verbosity)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_flags = parser.add_argument_group("configuration (gin)")
    gin_flags.add_argument("--gin_file", action="append", default=[], metavar="PATH",
                           help="a gin file; repeatable, later files override earlier ones")
    gin_flags.add_argument("--gin_bindings", action="append", default=[],
                           metavar="NAME=VALUE", help="one gin binding; repeatable")
    gin_flags.add_argument("--gin.NAME", metavar="VALUE", dest="_gin_shorthand_help",
                           help="shorthand for --gin_bindings=NAME=VALUE, e.g. "
                           "--gin.TRAIN_STEPS=100")
    gin_flags.add_argument("--gin_search_paths", action="append", default=[],
                           metavar="DIR",
                           help="extra folder in which gin files and includes are looked "
                           "up; repeatable")
    parser.add_argument("--verbosity", type=int, choices=sorted(_VERBOSITY), default=0,
                        help="0: our lines only; 1: also library logs, TensorFlow warnings "
                        "and tracebacks; 2: everything")
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str]
                ) -> tuple[argparse.Namespace, list[str]]:
    """(flags, gin bindings): --gin_bindings values first, then --gin.NAME=VALUE ones."""
    argv, shorthand = gin_config.split_gin_shorthand(argv)
    args = parser.parse_args(argv)
    return args, args.gin_bindings + shorthand


def configure_output(verbosity: int) -> None:
    """Our INFO lines with timestamps; libraries and TensorFlow per `verbosity`.

    Call before TensorFlow is imported (gin files import the data layer).
    """
    tf_level, library_level = _VERBOSITY[verbosity]
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_level     # the flag decides, not the shell
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s] %(message)s")
    logging.getLogger("t5x_like").setLevel(logging.DEBUG if verbosity == 2 else logging.INFO)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    if verbosity == 0:
        # Deprecation and similar notices from libraries; ours go through logging.
        warnings.filterwarnings("ignore")


def parse_gin(args: argparse.Namespace, bindings: Sequence[str]) -> None:
    """Parses the gin flags; on a bad config, exits with one `error: ...` line."""
    try:
        with _native_stderr_silenced(args.verbosity == 0):
            gin_config.parse(gin_files=args.gin_file, gin_bindings=bindings,
                             search_paths=args.gin_search_paths)
    except gin_config.GinConfigError as e:
        exit_with_error(e, args.verbosity)


@contextlib.contextmanager
def _native_stderr_silenced(silence: bool) -> Iterator[None]:
    """File descriptor 2 -> /dev/null inside (C++ libraries write there directly).

    Python exceptions still propagate; only what is printed to stderr is lost.
    """
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def exit_with_error(error: BaseException, verbosity: int) -> None:
    """`error: <message>` and a non-zero exit; the traceback too from --verbosity=1."""
    if verbosity:
        import traceback
        traceback.print_exception(error)
    sys.exit(f"error: {gin_config.without_call_context(str(error))}")


# --------------------------------------------------------------------------- processes

def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that join this process to a multi-host (or simulated multi-device) run."""
    group = parser.add_argument_group("processes and devices")
    group.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0 (multi-host)")
    group.add_argument("--num_processes", type=int, metavar="N",
                       help="total JAX processes (multi-host)")
    group.add_argument("--process_id", type=int, metavar="I",
                       help="this process's index (multi-host)")
    group.add_argument("--heartbeat_timeout_seconds", type=int, default=100, metavar="S",
                       help="a process silent this long is declared dead; the others exit")
    group.add_argument("--distributed", choices=["auto", "off"], default="off",
                       help="auto: jax.distributed.initialize() detects the cluster (Cloud "
                       "TPU VM, SLURM, Open MPI); explicit coordinator flags win")
    group.add_argument("--num_cpu_devices", type=int, metavar="N",
                       help="simulate this many CPU devices (sharding on a laptop)")


def start_jax(args: argparse.Namespace) -> None:
    """Applies the process flags: simulated devices, then the distributed runtime."""
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
