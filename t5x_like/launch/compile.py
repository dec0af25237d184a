"""Will it fit? Compile the train step for a TPU slice on this (CPU) machine.

  python -m launch.compile --gin_file=configs/base.gin \
      --gin_file=configs/models/t5_1_1_xl.gin --gin_file=configs/partitioning/fsdp.gin \
      --topology=v5p-128 [--num_slices=2] [--gin.BATCH_SIZE=512]

Compiles the run `launch.train` would run with the same flags. Prints per-device
memory against the chip's HBM and FLOPs per step; exits 1 when it does not fit.
`--search` finds the largest batch per data shard that fits, once per
`--search_bindings=LABEL:BINDING[;BINDING...]` (e.g. one per remat policy). Needs
libtpu: pip install -e ".[tpu]". The logic is in t5x_like/training/aot.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from t5x_like.launch import launcher

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile-only: never claim a local TPU


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from t5x_like.data import converters
    p = launcher.flag_parser(__doc__, prog="python -m launch.compile")
    p.add_argument("--topology", required=True,
                   help="v5p-128, v4-32, v5litepod-16, v6e-64, v5e:4x4, 2xv5p-128, ...")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
    p.add_argument("--batch_size", type=int, help="global batch (default: the run's)")
    p.add_argument("--feature_lengths", help="task lengths, e.g. inputs=512,targets=114 "
                   "(default: the run's data source; given, no data source is built)")
    p.add_argument("--feature_converter", choices=sorted(converters.CONVERTERS),
                   help="with --feature_lengths: the batch layout (default enc_dec)")
    p.add_argument("--search", action="store_true", help="find the largest batch that fits")
    p.add_argument("--search_bindings", action="append", default=[],
                   help="LABEL:BINDING[;BINDING...], one search per flag (implies --search)")
    p.add_argument("--max_batch_per_shard", type=int, default=4096, help="search upper end")
    p.add_argument("--json_out", help="also write the report(s) here as JSON")
    return launcher.parse_flags(p, argv)


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    launcher.configure_output(args.verbosity)
    launcher.parse_gin(args, bindings)      # a bad config fails here, in one line
    from t5x_like.training import aot
    from t5x_like.config import gin_config
    from t5x_like.parallel import topologies
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
        launcher.exit_with_error(e, args.verbosity)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(aot.to_json(reports))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
