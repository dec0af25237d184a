"""Splash vs einsum attention: per-device memory of the train step compiled for TPU v5e.

    JAX_PLATFORMS=cpu python -m benchmarks.attention_memory [--lengths 2048 8192]

Compiles, on this CPU machine with libtpu (the `tpu` extra), the real train step of
the 125M decoder (configs/models/decoder_125m.gin: 12 layers, 12 heads of 64, scanned,
bf16, `save_dots_no_batch` remat) for a v5e:2x2 slice with FSDP over its 4 chips,
batch 8 (2 sequences per chip), through `aot.fit_for_gin`: the path `launch.compile`
takes. Per length, `attention_impl='xla'` (our einsum: [B, H, L, L] logits) against
`'splash'` (the Pallas kernel under shard_map, blocks of 512). Reports XLA's
temporaries, the step's peak per device against the chip's 16 GiB, and the compile
time; where XLA's TPU compiler refuses a program larger than HBM, the peak is the
compiler's own figure. Prints a table, writes benchmarks/results/attention_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIN_FILES = ["configs/base_lm.gin", "configs/models/decoder_125m.gin",
             "configs/partitioning/fsdp.gin"]
GiB = 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    os.chdir(REPO)
    from t5x_like.training import aot
    from t5x_like.parallel import topologies
    tpu = topologies.parse(args.topology)
    rows = []
    for length in args.lengths:
        for impl in ("xla", "splash"):
            start = time.perf_counter()
            report = aot.fit_for_gin(
                tpu=tpu, gin_files=GIN_FILES, batch_size=args.batch_size,
                gin_bindings=[f"decoder.DecoderConfig.attention_impl='{impl}'"],
                task_feature_lengths={"targets": length}, feature_converter="lm")
            rows.append({"length": length, "attention": impl,
                         "temp_gib": report.temp_bytes / GiB,
                         "peak_gib": report.peak_bytes / GiB, "fits": report.fits,
                         "compiler_refused": report.error is not None,
                         "seconds": time.perf_counter() - start})
            print(f"compiled L={length} {impl}: {rows[-1]}", flush=True)
    print(f"\n125M decoder, {tpu}, FSDP, batch {args.batch_size}, per device "
          f"(HBM {tpu.chip.hbm_bytes / GiB:.0f} GiB)")
    print(f"{'length':>7} {'attention':>10} {'temporaries GiB':>16} {'peak GiB':>9} "
          f"{'fits':>5} {'compile s':>10}")
    for row in rows:
        temp = "-" if row["compiler_refused"] else f"{row['temp_gib']:.2f}"
        print(f"{row['length']:>7} {row['attention']:>10} {temp:>16} {row['peak_gib']:>9.2f} "
              f"{str(row['fits']):>5} {row['seconds']:>10.0f}")
    for length in args.lengths:
        xla, splash = (next(r for r in rows if r["length"] == length and r["attention"] == a)
                       for a in ("xla", "splash"))
        print(f"L={length}: splash peak = {splash['peak_gib'] / xla['peak_gib']:.2f}x einsum's")
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "attention_memory.json"), "w") as f:
        json.dump({"topology": str(tpu), "batch_size": args.batch_size,
                   "gin_files": GIN_FILES, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
