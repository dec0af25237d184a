"""Export a run's checkpoint for Hugging Face: the model, or a LoRA run's adapters.

  python -m launch.export --gin_file=configs/finetune_lora_section_titles.gin \
      --format=hf --output_dir=exported/merged          # transformers loads it
  python -m launch.export --gin_file=configs/finetune_lora_section_titles.gin \
      --format=peft --output_dir=exported/adapter       # PEFT loads it onto its base

--format=hf merges a LoRA run's adapters into the base first. The logic is in
t5x_like/checkpointing/hf_export.py.
"""

from __future__ import annotations

import argparse
import sys

from t5x_like.launch import launcher


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = launcher.flag_parser(__doc__, prog="python -m launch.export")
    launcher.add_process_flags(p)
    p.add_argument("--format", required=True, choices=("hf", "peft"),
                   help="hf: the whole model (adapters merged); peft: the adapters alone")
    p.add_argument("--output_dir", required=True, metavar="DIR", help="where it is written")
    p.add_argument("--checkpoint", metavar="STEP|latest",
                   help="the run's checkpoint to export (default: the latest)")
    return launcher.parse_flags(p, argv)


def main(argv: list[str] | None = None) -> None:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    with launcher.started(args, bindings):
        import gin
        from t5x_like.checkpointing import hf_export
        from t5x_like.training import run_config
        try:
            hf_export.export_run_checkpoint(
                run=run_config.from_gin(), model_dir=gin.query_parameter("%MODEL_DIR"),
                checkpoint=args.checkpoint, kind=args.format, output_dir=args.output_dir)
        except (ValueError, OSError) as e:       # config and checkpoint errors
            launcher.exit_with_error(e, args.verbosity)


def program() -> None:
    """The process entry point (`python -m launch.export`)."""
    launcher.run_program(main)


if __name__ == "__main__":
    program()
