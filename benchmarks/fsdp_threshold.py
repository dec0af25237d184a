"""Does keeping small tensors replicated under FSDP speed up the step? (8 CPU devices)

big_vision shards a parameter over the FSDP axis only above a minimum size: gathering
a 256-element norm scale costs a collective and saves nothing. This measures such a
threshold (applied here, to the state's shardings: state tensors with fewer than N
elements keep their other axes but are not split over `fsdp`; the library has no
threshold because this showed no gain) on the 8-device CPU mesh the tests use: the CPU
default model (configs/models/t5_1_1_cpu.gin, 11.3M parameters, Adafactor), batch
32 of 128 -> 32 packed synthetic tokens, FSDP over 8 devices, for several
thresholds, against plain data parallelism on the same devices as the baseline.

Every configuration is compiled first; then rounds of `--steps` steps run each
configuration in turn (interleaved, so drift on a shared machine hits all alike),
and the table reports the median over rounds of the per-step time.

    JAX_PLATFORMS=cpu python -m benchmarks.fsdp_threshold [--rounds 7 --steps 5]

Prints a table; writes benchmarks/results/fsdp_threshold.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from benchmarks.model_step import load_model  # noqa: E402
from t5x_like.training import optimizers  # noqa: E402
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fsdp_threshold.json"
BATCH, ENC_LEN, DEC_LEN = 32, 128, 32

FSDP = dict(data_parallelism=1, fsdp_parallelism=8)
# label -> (Partitioner kwargs, threshold in elements)
CONFIGS = {
    "data parallel (baseline)": (dict(data_parallelism=8), 0),
    "FSDP, threshold 0 (every tensor split)": (FSDP, 0),
    "FSDP, < 4,096 replicated (norms, relpos)": (FSDP, 4096),
    "FSDP, < 65,537 replicated (+ attention)": (FSDP, 65537),
}


def _without_fsdp(sharding, shape, threshold):
    if math.prod(shape) >= threshold:
        return sharding
    def drop(entry):
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != "fsdp")
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return None if entry == "fsdp" else entry
    spec = jax.sharding.PartitionSpec(*(drop(e) for e in sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, spec)


def build(model, part_kwargs, threshold):
    part = partitioning.Partitioner(**part_kwargs)
    optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule(warmup_steps=100))
    source = synthetic.SyntheticEncDecSource(encoder_length=ENC_LEN,
                                                  decoder_length=DEC_LEN, vocab_size=8192)
    lengths = source.model_feature_lengths()
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=part,
                                  feature_lengths=lengths)
    layout = dataclasses.replace(layout, shardings=jax.tree.map(
        lambda s, a: _without_fsdp(s, a.shape, threshold), layout.shardings, layout.abstract))
    state = trainer.init_train_state(model=model, optimizer=optimizer, partitioner=part,
                                     feature_lengths=lengths, seed=0, layout=layout)
    step = trainer.jit_train_step(trainer.make_train_step(model=model, optimizer=optimizer),
                                  partitioner=part, layout=layout,
                                  batch_feature_names=tuple(lengths))
    batch = partitioning.global_batch(
        source.batch(step=0, shard_index=0, batch_size=BATCH), part)
    replicated = sum(1 for s in jax.tree.leaves(layout.shardings.params)
                     if "fsdp" not in str(s.spec))
    return {"step": step, "state": state, "batch": batch, "replicated": replicated,
            "tensors": len(jax.tree.leaves(layout.shardings.params))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model = load_model("t5_1_1_cpu", [])
    runs = {}
    for label, (kwargs, threshold) in CONFIGS.items():
        run = build(model, kwargs, threshold)
        start = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], run["batch"])
        run["first_loss"] = float(metrics["loss"])
        run["compile_and_first_step_s"] = time.perf_counter() - start
        run["times"] = []
        runs[label] = run
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(next(iter(runs.values()))["times"])
    rows = []
    for label, run in runs.items():
        median = statistics.median(run["times"])
        rows.append({"config": label, "replicated_tensors": run["replicated"],
                     "tensors": run["tensors"], "median_step_s": median,
                     "min_step_s": min(run["times"]), "max_step_s": max(run["times"]),
                     "vs_baseline": median / base, "first_loss": run["first_loss"],
                     "compile_and_first_step_s": run["compile_and_first_step_s"]})
    print("| config | replicated / tensors | median s/step | min..max | vs DP | first loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['replicated_tensors']} / {r['tensors']} | "
              f"{r['median_step_s']:.3f} | {r['min_step_s']:.3f}..{r['max_step_s']:.3f} | "
              f"{r['vs_baseline']:.2f} | {r['first_loss']:.6f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   "(shared), 8 simulated CPU devices",
        "jax": jax.__version__, "model": "t5_1_1_cpu", "batch": BATCH,
        "lengths": [ENC_LEN, DEC_LEN], "rounds": args.rounds, "steps_per_round": args.steps,
        "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
