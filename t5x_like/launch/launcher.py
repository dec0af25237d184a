"""What every entry point shares: one flag block, quiet output, gin, errors, processes.

`launch/train.py` and `launch/compile.py` (and any later entry point) build their
parser with `flag_parser`, which already holds the gin flags and `--verbosity`, add
only their own flags, and call `parse_flags`, `configure_output` and `parse_gin`.

Quiet by default: a run prints our own lines only. TensorFlow's C++ notices (a
cuInit error, tf.data's cache warning on every start) obey TF_CPP_MIN_LOG_LEVEL,
which `configure_output` sets before anything imports TensorFlow; the ones printed
while its libraries load (oneDNN, "Could not find cuda drivers") come before any log
level applies, so `parse_gin`, where gin files import the data layer, runs with the
process's native stderr sent to /dev/null. `--verbosity=1` (or `--verbose`) shows
library warnings and INFO logs, TF's warnings and tracebacks with errors;
`--verbosity=2` everything.

Errors: an `errors.RunError` (bad input, full disk, NaN halt...) is printed as one
line, `error: <what> — <fix>`, and the process exits with status 1. Its traceback
goes to the run's log file (`log_to_file`: every log record, libraries' warnings
included, with timestamps) and, with --verbose, to the console; the line says where.
`run_program` is how an entry point runs as a process: a SIGTERM is a clean stop
from its first line on, and an error exit never waits for library threads (Orbax's
writers can hold a failed process open for minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from t5x_like import errors, storage
from t5x_like.config import gin_config
from t5x_like.training import preemption

# --verbosity -> (TF_CPP_MIN_LOG_LEVEL, level of library loggers). At 0 the console
# shows none of theirs; their warnings still reach the log file.
_VERBOSITY = {0: ("3", logging.WARNING), 1: ("1", logging.INFO), 2: ("0", logging.DEBUG)}
_LIBRARY_LOGGERS = ("absl", "orbax", "jax", "tensorflow", "seqio", "etils", "fsspec",
                    "gcsfs", "google")
# Loggers of this repository: shown on the console at every verbosity.
_OUR_LOGGERS = ("t5x_like", "data", "launch", "__main__")
_FORMAT = "%(asctime)s %(levelname)s %(name)s] %(message)s"
# How often a log file on an object store is rewritten (a killed run loses at most this).
LOG_UPLOAD_INTERVAL_S = 10.0
# A log record with this attribute set goes to the log file only.
FILE_ONLY = "file_only"

log = logging.getLogger(__name__)
_log_file: str | None = None
_watchdog = None          # the PeerWatchdog of a multi-process run


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
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                        help="the same as --verbosity=1 (e.g. an error's traceback)")
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str]
                ) -> tuple[argparse.Namespace, list[str]]:
    """(flags, gin bindings): --gin_bindings values first, then --gin.NAME=VALUE ones."""
    argv, shorthand = gin_config.split_gin_shorthand(argv)
    args = parser.parse_args(argv)
    return args, args.gin_bindings + shorthand


class _ConsoleFilter(logging.Filter):
    def __init__(self, *, show_libraries: bool):
        super().__init__()
        self._show_libraries = show_libraries

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        return self._show_libraries or record.name.split(".")[0] in _OUR_LOGGERS


def configure_output(verbosity: int) -> None:
    """Our INFO lines with timestamps; libraries and TensorFlow per `verbosity`.

    Call before TensorFlow is imported (gin files import the data layer).
    """
    global _log_file
    _log_file = None              # replaced, with the handlers, by log_to_file
    tf_level, library_level = _VERBOSITY[verbosity]
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_level     # the flag decides, not the shell
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(_FORMAT))
    console.addFilter(_ConsoleFilter(show_libraries=verbosity > 0))
    logging.basicConfig(level=logging.INFO, force=True, handlers=[console])
    logging.getLogger("t5x_like").setLevel(logging.DEBUG if verbosity == 2 else logging.INFO)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    if verbosity == 0:
        # Deprecation and similar notices from libraries; ours go through logging.
        warnings.filterwarnings("ignore")


def log_to_file(path: str) -> str | None:
    """Appends every log record from now on to `path` (created with its folder; a
    local path or a URL); returns the path, or None if it cannot be written (nothing
    else fails). An object store cannot append: there the log is rewritten whole at
    most every LOG_UPLOAD_INTERVAL_S seconds and when logging shuts down (which an
    error exit does before it ends the process)."""
    global _log_file
    try:
        if storage.is_url(path):
            handler = _ObjectStoreLogHandler(storage.AppendableFile(
                path, min_flush_interval_s=LOG_UPLOAD_INTERVAL_S))
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handler = logging.FileHandler(path, mode="a")
    except OSError as e:
        log.debug("no log file at %s: %s", path, e)
        return None
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    _log_file = path
    log.info("started: %s", " ".join(sys.argv), extra={FILE_ONLY: True})
    return path


class _ObjectStoreLogHandler(logging.StreamHandler):
    """A log file on an object store: `close` (at logging's shutdown) writes the
    last records, which StreamHandler, not owning its stream, would leave behind."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


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


def exit_with_error(error: BaseException, verbosity: int) -> NoReturn:
    """`error: <what> — <fix>` and a non-zero exit (SystemExit).

    The traceback goes to the log file (the line says where) and, from
    --verbosity=1, to the console.
    """
    line = error.one_line() if isinstance(error, errors.RunError) else \
        " ".join(gin_config.without_call_context(str(error)).split())
    if verbosity:
        traceback.print_exception(error)
    if _log_file:
        log.error("error: %s", line, exc_info=error, extra={FILE_ONLY: True})
        line = f"{line} (log: {_log_file})"
    sys.exit(f"error: {line}")


@contextlib.contextmanager
def started(args: argparse.Namespace, bindings: Sequence[str],
            gin_files_first: Sequence[str] = ()) -> Iterator[None]:
    """What every entry point does first: quiet output, JAX (and its processes)
    started, gin parsed after `gin_files_first`; inside, a RunError is one line."""
    configure_output(args.verbosity)
    with errors_reported(args.verbosity):
        start_jax(args)
        args.gin_file = [*gin_files_first, *args.gin_file]
        parse_gin(args, bindings)
        yield


@contextlib.contextmanager
def errors_reported(verbosity: int) -> Iterator[None]:
    """Inside, a RunError ends the process with its one line (`exit_with_error`)."""
    try:
        yield
    except errors.RunError as e:
        exit_with_error(e, verbosity)


def run_program(main: Callable[[], object]) -> NoReturn:
    """Runs an entry point as this process's program, and ends the process.

    First, SIGTERM becomes a request to stop cleanly (training/preemption.py), so a preemption
    during start-up loses nothing. A clean exit shuts down normally. An exit with an
    error prints its line, tells the other processes of the run, flushes the logs
    and ends the process at once: library threads (Orbax's writers after a failed
    write, asyncio tasks) must not keep it alive or bury the line under their noise.
    An error from a collective that broke is, in a run of several processes, most
    often another process dying: the watchdog then speaks first (it names that
    process), and this error is reported only if every peer still answers.
    """
    preemption.notice_sigterm()
    _send_background_tracebacks_to_the_log()
    message = error = None
    is_bug = False
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        message = None if isinstance(e.code, int) or e.code is None else str(e.code)
        error = e
    except KeyboardInterrupt:
        code, message = 130, ("error: interrupted (Ctrl-C) — rerun the same command to "
                              "resume from the last complete checkpoint")
    except BaseException as e:  # noqa: BLE001 - a bug: its traceback is what helps
        code, error, is_bug = 1, e, True
    if _watchdog is not None:
        from t5x_like.parallel import collective_failures
        if code != 0 and collective_failures.collective_failure_in(error) is not None:
            _watchdog.await_verdict()    # ends the process, naming the peer, if it is gone
        _watchdog.leave(code)
    if is_bug:
        traceback.print_exception(error)
    if code == 0:
        sys.exit(0)
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _send_background_tracebacks_to_the_log() -> None:
    """Tracebacks that libraries' threads and callbacks print on their own (after a
    failed checkpoint write, dozens of asyncio "Event loop is closed" ones from
    Orbax's writers) go through logging as a library's records: to the log file, and
    to the console from --verbosity=1. They must not bury the one error line."""
    background = logging.getLogger("background")

    def record(exc_type, value, tb, where: str) -> None:
        try:
            background.warning("exception in %s", where, exc_info=(exc_type, value, tb))
        except Exception:  # noqa: BLE001 - during interpreter shutdown: drop it
            pass

    sys.excepthook = lambda t, v, tb: record(t, v, tb, "library code")
    sys.unraisablehook = lambda u: record(u.exc_type, u.exc_value, u.exc_traceback,
                                          f"{u.object!r}")
    threading.excepthook = lambda a: record(a.exc_type, a.exc_value, a.exc_traceback,
                                            f"thread {a.thread.name if a.thread else '?'}")


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
                       help="a process silent this long is declared dead; the others "
                       "exit, naming it and the last checkpoint")
    group.add_argument("--distributed", choices=["auto", "off"], default="off",
                       help="auto: jax.distributed.initialize() detects the cluster (Cloud "
                       "TPU VM, SLURM, Open MPI); explicit coordinator flags win")
    group.add_argument("--num_cpu_devices", type=int, metavar="N",
                       help="simulate this many CPU devices (sharding on a laptop)")


def start_jax(args: argparse.Namespace) -> None:
    """Applies the process flags: simulated devices, then the distributed runtime
    and, with several processes, the watchdog that ends this one cleanly when another
    dies (training/peer_watchdog.py)."""
    global _watchdog
    import jax
    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
    # JAX's own verdict (an abort from C++) comes well after the watchdog's.
    jax_timeout = 2 * args.heartbeat_timeout_seconds + 10
    if args.num_processes and args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id, heartbeat_timeout_seconds=jax_timeout)
    elif args.distributed == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=jax_timeout)
    if jax.process_count() > 1:
        from t5x_like.training import jax_coordination, peer_watchdog
        _watchdog = peer_watchdog.PeerWatchdog(
            client=jax_coordination.coordination_client(), process_index=jax.process_index(),
            process_count=jax.process_count(),
            timeout_s=args.heartbeat_timeout_seconds).start()


def watch_checkpoints(directory: str) -> None:
    """Has the line printed when another process is lost name the last complete
    checkpoint in `directory`."""
    if _watchdog is None:
        return
    from t5x_like.checkpointing import checkpoints

    def describe() -> str:
        steps = checkpoints.committed_steps(directory)
        return (f"the last complete checkpoint is step {steps[-1]} in {directory}" if steps
                else f"no checkpoint was completed in {directory}")
    _watchdog.describe_progress = describe
