"""Evaluate checkpoints: `python -m launch.eval --gin_file=... --gin.MODEL_DIR=...
--checkpoint=latest|all|STEP [--watch]`.

Use the gin files the run was trained with. Each checkpoint's parameters are scored
on the validation split (teacher-forced loss, accuracy, perplexity per task, and each
task's seqio metric_fns on its greedy decoding); scores go to TensorBoard and to
MODEL_DIR/eval/checkpoint_<step>.json. Steps already evaluated with the same
settings are skipped. `--watch` keeps evaluating new checkpoints while a training
job writes them, until the run's last step (%TRAIN_STEPS) or `--timeout`. Everything
else is gin (`checkpoint_eval.evaluate_checkpoints.*`, e.g. eval_batches).
"""

from __future__ import annotations

import argparse
import sys

from t5x_like.launch import launcher


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = launcher.flag_parser(__doc__, prog="python -m launch.eval")
    parser.add_argument("--checkpoint", default="latest", metavar="latest|all|STEP",
                        help="which checkpoints: the newest, every one, or one step")
    parser.add_argument("--watch", action="store_true",
                        help="keep polling MODEL_DIR for new checkpoints")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="with --watch: stop after S seconds without a new checkpoint")
    parser.add_argument("--poll_seconds", type=float, default=10.0, metavar="S",
                        help="with --watch: how often to look for new checkpoints")
    launcher.add_process_flags(parser)
    return launcher.parse_flags(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    with launcher.started(args, bindings):
        import gin
        from t5x_like.evaluation import checkpoint_eval
        from t5x_like.checkpointing import checkpoints
        from t5x_like.training import run_config
        try:
            checkpoint = checkpoint_eval.parse_checkpoint(args.checkpoint)
            gin.get_configurable(checkpoint_eval.evaluate_checkpoints)(
                run=run_config.from_gin(), checkpoint=checkpoint, watch=args.watch,
                timeout_s=args.timeout, poll_s=args.poll_seconds)
        except (ValueError, FileNotFoundError, checkpoints.CheckpointMismatchError) as e:
            launcher.exit_with_error(e, args.verbosity)


def program() -> None:
    """The process entry point (`python -m launch.eval`, `t5x_like-eval`)."""
    launcher.run_program(main)


if __name__ == "__main__":
    program()
