"""Will it fit? Compile the train step for a TPU slice on this (CPU) machine.

  python -m launch.compile --gin_file=configs/base.gin \
      --gin_file=configs/models/t5_1_1_xl.gin --gin_file=configs/partitioning/fsdp.gin \
      --topology=v5p-128 [--num_slices=2] [--gin.BATCH_SIZE=512]

Prints per-device memory against the chip's HBM and FLOPs per step; exits 1 when it
does not fit. `--search` finds the largest batch per data shard that fits, once per
`--search_bindings=LABEL:BINDING[;BINDING...]` (e.g. one per remat policy). Needs
libtpu: pip install -e ".[tpu]". The logic is in t5x_like/aot.py.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile-only: never claim a local TPU


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from t5x_like.data import converters
    from t5x_like.gin_config import split_gin_shorthand
    argv, shorthand = split_gin_shorthand(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="Repeatable.")
    p.add_argument("--gin_bindings", action="append", default=[], help="Repeatable.")
    p.add_argument("--gin_search_paths", action="append", default=[])
    p.add_argument("--topology", required=True,
                   help="v5p-128, v4-32, v5litepod-16, v6e-64, v5e:4x4, 2xv5p-128, ...")
    p.add_argument("--num_slices", type=int, default=1, help="Slices joined over DCN.")
    p.add_argument("--batch_size", type=int, help="Global batch (default: gin BATCH_SIZE).")
    p.add_argument("--feature_lengths", help="Task lengths, e.g. inputs=512,targets=114 "
                   "(default: gin TASK_FEATURE_LENGTHS).")
    p.add_argument("--feature_converter", choices=sorted(converters.CONVERTERS))
    p.add_argument("--search", action="store_true", help="Find the largest batch that fits.")
    p.add_argument("--search_bindings", action="append", default=[],
                   help="LABEL:BINDING[;BINDING...], one search per flag (implies --search).")
    p.add_argument("--max_batch_per_shard", type=int, default=4096)
    p.add_argument("--json_out", help="Also write the report(s) here as JSON.")
    args = p.parse_args(argv)
    return args, args.gin_bindings + shorthand


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    from t5x_like import aot, gin_config, topologies
    try:
        tpu = topologies.parse(args.topology, num_slices=args.num_slices)
        lengths = None if not args.feature_lengths else {
            k: int(v) for k, v in (kv.split("=") for kv in args.feature_lengths.split(","))}
        common = dict(tpu=tpu, gin_files=args.gin_file, gin_bindings=bindings,
                      search_paths=args.gin_search_paths, task_feature_lengths=lengths,
                      feature_converter=args.feature_converter)
        if args.search or args.search_bindings:
            variants = {label: [b for b in rest.split(";") if b] for label, _, rest in
                        (v.partition(":") for v in args.search_bindings)} or None
            print(f"Largest batch that fits on {tpu}:")
            results = aot.search_for_gin(variants=variants,
                                         max_per_shard=args.max_batch_per_shard, **common)
            for label, (best, report) in results.items():
                where = f"global {report.batch_size}, peak {report.peak_bytes / 2**30:.2f} GiB" \
                    if report else "nothing fits"
                print(f"{label}: {best} per data shard ({where})")
            reports = [r for _, r in results.values() if r]
            ok = bool(reports)
        else:
            reports = [aot.fit_for_gin(batch_size=args.batch_size, **common)]
            print(reports[0].summary())
            ok = reports[0].fits
    except (ValueError, RuntimeError, gin_config.GinConfigError) as e:
        sys.exit(f"error: {e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(aot.to_json(reports))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
