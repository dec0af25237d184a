"""Train a model: `python -m launch.train --gin_file=configs/base.gin [--gin.NAME=VALUE ...]`.

Flags pick gin files and bindings and, for multi-host runs, the JAX processes;
everything else is gin. The run is `t5x_like.run_config.from_gin()`, trained by
`t5x_like.train.train` (whose own arguments, e.g. `train_lib.train.log_every_steps`,
are gin bindings too). `launch.compile` compiles the same run for a TPU slice.
"""

from __future__ import annotations

import argparse
import sys

from t5x_like import launcher


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = launcher.flag_parser(__doc__, prog="python -m launch.train")
    launcher.add_process_flags(parser)
    return launcher.parse_flags(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    launcher.configure_output(args.verbosity)
    launcher.start_jax(args)
    launcher.parse_gin(args, bindings)

    import gin
    from t5x_like import run_config
    from t5x_like import train as train_lib
    try:
        run = run_config.from_gin()
    except ValueError as e:          # the config describes no complete run
        launcher.exit_with_error(e, args.verbosity)
    gin.get_configurable(train_lib.train)(run=run)


if __name__ == "__main__":
    main()
