"""Checkpoint save/restore throughput vs the disk itself, and the async-save overhead.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_io.py [--gigabytes 1.0]

In one run:
  1. the disk: write the same bytes with plain file I/O (+fsync), read them back
     with the page cache dropped (posix_fadvise DONTNEED) -> GB/s;
  2. Orbax via t5x_like.checkpointing.checkpoints: a ~1 GB state sharded over 8 CPU devices,
     async save until complete, and restore onto the same shardings -> GB/s, plus
     how long `save()` blocks the caller (the device->host copy);
  3. the train loop: step time of the CPU default model with no save in flight vs
     the steps that start a save and run while it is written;
  4. the integrity check's cost (checkpointing/integrity.py): save+restore round trips with the
     fingerprints (as shipped) and without them (fingerprinting and verification
     switched off in this process only), interleaved `--integrity_repeats` times so
     that load from other jobs falls on both alike -> median GB/s of each, and the
     fingerprint pass alone.
Prints a table and writes benchmarks/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from t5x_like.checkpointing import checkpoints  # noqa: E402
from t5x_like.checkpointing import integrity
from t5x_like import tree_paths
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic  # noqa: E402
from t5x_like.models import t5  # noqa: E402

GB = 1e9


def drop_page_cache(paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_baseline(directory, arrays):
    paths = [os.path.join(directory, f"raw_{i}.bin") for i in range(len(arrays))]
    start = time.perf_counter()
    for path, array in zip(paths, arrays):
        with open(path, "wb") as f:
            f.write(memoryview(array))
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_page_cache(paths)
    start = time.perf_counter()
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    read_s = time.perf_counter() - start
    for path in paths:
        os.remove(path)
    return write_s, read_s, total


def orbax_roundtrip(directory, state):
    ckpt = checkpoints.Checkpointer(directory=directory, max_to_keep=None)
    start = time.perf_counter()
    ckpt.save(1, state, data_position={"step": 1})
    blocking_s = time.perf_counter() - start
    ckpt.wait_until_finished()
    save_s = time.perf_counter() - start
    files = [f for f in glob.glob(f"{directory}/**/*", recursive=True) if os.path.isfile(f)]
    os.sync()
    drop_page_cache(files)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    start = time.perf_counter()
    restored, _ = ckpt.restore(1, abstract_state=abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a[:2]), np.asarray(b[:2]))
    return blocking_s, save_s, restore_s


@contextlib.contextmanager
def integrity_switched_off():
    """Checkpoints without fingerprints: nothing computed at save, nothing verified at
    restore (the baseline the integrity check is measured against)."""
    fingerprints, verify = integrity.fingerprints, checkpoints.Checkpointer._verify
    integrity.fingerprints = lambda arrays: {}
    checkpoints.Checkpointer._verify = lambda self, step, state: None
    try:
        yield
    finally:
        integrity.fingerprints, checkpoints.Checkpointer._verify = fingerprints, verify


def integrity_cost(directory, state, repeats):
    """Round trips with and without the fingerprints, interleaved; the medians."""
    runs = {"with": [], "without": []}
    for i in range(repeats):
        for variant in ("without", "with") if i % 2 else ("with", "without"):
            path = os.path.join(directory, f"{variant}_{i}")
            with integrity_switched_off() if variant == "without" else contextlib.nullcontext():
                runs[variant].append(orbax_roundtrip(path, state))
            shutil.rmtree(path, ignore_errors=True)
    fingerprint_s = []
    flat = tree_paths.flatten(state)
    integrity.fingerprints(flat)                        # compile, not measured
    for _ in range(repeats):
        start = time.perf_counter()
        integrity.fingerprints(flat)
        fingerprint_s.append(time.perf_counter() - start)
    return {variant: {"save_s": [r[1] for r in rs], "restore_s": [r[2] for r in rs],
                      "median_save_s": float(np.median([r[1] for r in rs])),
                      "median_restore_s": float(np.median([r[2] for r in rs]))}
            for variant, rs in runs.items()} | {
                "fingerprint_s": fingerprint_s,
                "median_fingerprint_s": float(np.median(fingerprint_s))}


def async_overhead(directory, steps=12, save_at=4):
    """Step times of the CPU default model, with one async save started at `save_at`."""
    config = t5.T5Config(vocab_size=8192, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024,
                         num_encoder_layers=3, num_decoder_layers=3)
    model = t5.EncoderDecoderModel(config=config)
    part = partitioning.Partitioner()
    opt = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    source = synthetic.SyntheticEncDecSource(encoder_length=128, decoder_length=32,
                                                  vocab_size=8100)
    lengths = source.model_feature_lengths()
    layout = trainer.state_layout(model=model, optimizer=opt, partitioner=part,
                                  feature_lengths=lengths)
    state = trainer.init_train_state(model=model, optimizer=opt, partitioner=part,
                                     feature_lengths=lengths, seed=0, layout=layout)
    step_fn = trainer.jit_train_step(trainer.make_train_step(model=model, optimizer=opt),
                                     partitioner=part, layout=layout,
                                     batch_feature_names=tuple(lengths))
    batches = source.iterator(per_host_batch_size=32, shard_index=0, num_shards=1, start_step=0)
    ckpt = checkpoints.Checkpointer(directory=directory, max_to_keep=None)
    state, _ = step_fn(state, partitioning.global_batch(next(batches), part))  # compile
    ckpt.save(0, state, data_position={"step": 0})      # Orbax's one-time setup, not measured
    ckpt.wait_until_finished()
    times, save_block_s = [], 0.0
    for i in range(1, steps + 1):
        batch = partitioning.global_batch(next(batches), part)
        start = time.perf_counter()
        if i == save_at:
            # As in train(): the save starts right after the step that produced the state.
            jax.block_until_ready(state)
            t = time.perf_counter()
            ckpt.save(i, state, data_position={"step": i})
            save_block_s = time.perf_counter() - t
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    ckpt.close()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    baseline = float(np.median(times[:save_at - 1] + times[save_at + 2:]))
    during = float(np.mean(times[save_at - 1:save_at + 2]))
    return {"state_mb": state_bytes / 1e6, "baseline_step_s": baseline,
            "save_call_blocks_s": save_block_s, "mean_step_s_while_saving": during,
            "overhead_pct": 100 * (during - baseline) / baseline}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="Where to write (default: a temp dir).")
    parser.add_argument("--integrity_repeats", type=int, default=5,
                        help="interleaved round trips with and without fingerprints")
    parser.add_argument("--only_integrity", action="store_true",
                        help="measure only the integrity check's cost (section 4)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.dir)
    mesh = partitioning.make_mesh(data=1, fsdp=8, model=1)
    n_arrays = 8
    per_array = int(args.gigabytes * GB / 4 / n_arrays) // (8 * 1024) * (8 * 1024)
    # Random values: incompressible, so no writer gets a head start from compression.
    state = {f"w{i}": jax.device_put(
        jax.random.normal(jax.random.key(i), (per_array // 1024, 1024), jnp.float32),
        NamedSharding(mesh, P("fsdp", None))) for i in range(n_arrays)}
    host_arrays = [np.asarray(x) for x in state.values()]
    nbytes = sum(a.nbytes for a in host_arrays)
    if args.only_integrity:
        try:
            cost = integrity_cost(root, state, args.integrity_repeats)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report_integrity(cost, nbytes)
        return
    try:
        write_s, read_s, _ = disk_baseline(root, host_arrays)
        blocking_s, save_s, restore_s = orbax_roundtrip(os.path.join(root, "ckpt"), state)
        overhead = async_overhead(os.path.join(root, "overhead"))
        cost = integrity_cost(root, state, args.integrity_repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        ("disk: plain write + fsync", nbytes / write_s / GB, write_s),
        ("disk: plain read (cache dropped)", nbytes / read_s / GB, read_s),
        ("orbax save (async, until complete)", nbytes / save_s / GB, save_s),
        ("orbax restore (sharded, cache dropped)", nbytes / restore_s / GB, restore_s),
    ]
    print(f"\nstate: {nbytes / GB:.2f} GB over 8 CPU devices ({n_arrays} arrays, fsdp-sharded)")
    print(f"{'what':<42}{'GB/s':>8}{'seconds':>10}")
    for name, rate, seconds in rows:
        print(f"{name:<42}{rate:>8.2f}{seconds:>10.2f}")
    print(f"save() blocks the caller for {blocking_s:.2f} s "
          f"({100 * blocking_s / save_s:.0f}% of the full save)")
    print(f"orbax vs disk: save {write_s / save_s:.2f}x, restore {read_s / restore_s:.2f}x "
          "of plain file I/O speed")
    print(f"\nasync overhead, CPU default model ({overhead['state_mb']:.0f} MB state): "
          f"step {overhead['baseline_step_s']:.3f} s without a save, "
          f"{overhead['mean_step_s_while_saving']:.3f} s over the 3 steps starting a save "
          f"(+{overhead['overhead_pct']:.0f}%); save() itself blocks "
          f"{overhead['save_call_blocks_s']:.3f} s")
    out = {"state_bytes": nbytes, "disk_write_s": write_s, "disk_read_s": read_s,
           "orbax_save_s": save_s, "orbax_save_blocking_s": blocking_s,
           "orbax_restore_s": restore_s, "async_overhead": overhead}
    write_json("checkpoint_io.json", out)
    report_integrity(cost, nbytes)


def report_integrity(cost, nbytes):
    print(f"\nintegrity check, {nbytes / GB:.2f} GB state, medians of "
          f"{len(cost['fingerprint_s'])} interleaved round trips:")
    print(f"{'what':<42}{'without':>10}{'with':>10}{'cost':>8}")
    for what, key in (("save GB/s (async, until complete)", "median_save_s"),
                      ("restore GB/s (sharded, cache dropped)", "median_restore_s")):
        without, with_ = nbytes / cost["without"][key] / GB, nbytes / cost["with"][key] / GB
        print(f"{what:<42}{without:>10.2f}{with_:>10.2f}{100 * (with_ / without - 1):>7.0f}%")
    print(f"fingerprint pass alone: {cost['median_fingerprint_s']:.3f} s "
          f"({nbytes / cost['median_fingerprint_s'] / GB:.2f} GB/s)")
    write_json("checkpoint_integrity.json", {"state_bytes": nbytes, **cost})


def write_json(name, out):
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(os.path.join("benchmarks/results", name), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
