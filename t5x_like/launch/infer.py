"""Decode prompts with a trained run or a Hugging Face checkpoint: one JSON line each.

  python -m launch.infer --gin_file=configs/base.gin --gin.MODEL_DIR="'runs/base'" \
      --input=prompts.jsonl --output=predictions.jsonl [--checkpoint=STEP]
  python -m launch.infer --hf_checkpoint=DIR --input=prompts.jsonl --output=out.jsonl
  python -m launch.infer --gin_file=configs/base_prefix_lm.gin \
      --gin.MODEL_DIR="'runs/base_prefix_lm'" --task=pydocs_prefix_lm --limit=32 ...

Each input line is {"inputs": "text"} or {"input_ids": [...]}. Decoding is gin:
`decode.DecodeConfig` (defaults in configs/runs/infer.gin), e.g.
--gin.decode.DecodeConfig.num_beams=4 or --gin.decode.DecodeConfig.temperature=0.7.
The logic is in t5x_like/decoding/inference.py.
"""

from __future__ import annotations

import argparse
import sys

from t5x_like.launch import launcher

DECODE_DEFAULTS = "configs/runs/infer.gin"


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = launcher.flag_parser(__doc__, prog="python -m launch.infer")
    launcher.add_process_flags(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--input", metavar="JSONL", help="prompts, one JSON object a line")
    prompts.add_argument("--task", metavar="NAME", help="or: a seqio task's examples")
    p.add_argument("--split", default="validation", help="with --task (default validation)")
    p.add_argument("--limit", type=int, metavar="N", help="decode only the first N prompts")
    p.add_argument("--output", required=True, metavar="JSONL", help="where predictions go")
    p.add_argument("--checkpoint", metavar="STEP|latest",
                   help="the run's checkpoint to load (default: the latest)")
    p.add_argument("--hf_checkpoint", metavar="DIR",
                   help="load a Hugging Face safetensors directory instead of the run")
    p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max_input_length", type=int, metavar="N",
                   help="prompt slots of the cache (default: the task's input length; 512)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return launcher.parse_flags(p, argv)


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    with launcher.started(args, bindings, gin_files_first=[DECODE_DEFAULTS]):
        from t5x_like.decoding import inference
        from t5x_like.training import run_config
        try:
            inference.infer_from_gin(
                input_path=args.input, task=args.task, split=args.split, limit=args.limit,
                output=args.output, checkpoint=args.checkpoint,
                hf_checkpoint=args.hf_checkpoint, batch_size=args.batch_size,
                max_input_length=args.max_input_length, seed=args.seed,
                run_from_gin=run_config.from_gin)
        except (ValueError, OSError) as e:       # InferError, config and checkpoint errors
            launcher.exit_with_error(e, args.verbosity)


def program() -> None:
    """The process entry point (`python -m launch.infer`, `t5x_like-infer`)."""
    launcher.run_program(main)


if __name__ == "__main__":
    program()
