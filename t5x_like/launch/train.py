"""Train a model: `python -m launch.train --gin_file=configs/base.gin [--gin.NAME=VALUE ...]`.

Flags pick gin files and bindings and, for multi-host runs, the JAX processes;
everything else is gin. The run is `t5x_like.training.run_config.from_gin()`, trained by
`t5x_like.training.train_loop.train` (whose own arguments, e.g. `train_loop.train.log_every_steps`,
are gin bindings too). `launch.compile` compiles the same run for a TPU slice.
A problem is one `error: ...` line; its traceback is in MODEL_DIR/logs/.
"""

from __future__ import annotations

import argparse
import sys

from t5x_like.launch import launcher


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = launcher.flag_parser(__doc__, prog="python -m launch.train")
    launcher.add_process_flags(parser)
    return launcher.parse_flags(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    with launcher.started(args, bindings):
        import gin
        import jax
        from t5x_like import errors, run_dir, storage
        from t5x_like.training import run_config, train_loop
        try:
            loop_bindings = gin.get_bindings(train_loop.train)
        except ValueError:     # not registered: no gin file imports the training loop
            loop_bindings = {}
        if not loop_bindings:  # it needs at least model_dir and train_steps
            raise errors.ConfigError(
                "the gin files configure no train_loop.train", fix="include "
                "'configs/runs/pretrain.gin' (or configs/base.gin) in your gin file")
        model_dir = loop_bindings.get("model_dir")
        if model_dir:
            storage.check_supported(model_dir, what="MODEL_DIR")
            launcher.log_to_file(run_dir.log_file(model_dir, jax.process_index()))
            launcher.watch_checkpoints(run_dir.checkpoints(model_dir))
        gin.get_configurable(train_loop.train)(run=run_config.from_gin())


def program() -> None:
    """The process entry point (`python -m launch.train`, `t5x_like-train`)."""
    launcher.run_program(main)


if __name__ == "__main__":
    program()
