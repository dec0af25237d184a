"""Checkpoint save and restore of the T5.1.1-small train state: local disk vs a bucket.

    JAX_PLATFORMS=cpu python -m benchmarks.storage [--repeats 3]

The state is T5.1.1-small's (76.96M parameters, float32, plus Adafactor's factored
statistics) on one CPU device, saved and restored through `checkpoints.Checkpointer`
(what `train()` uses: Orbax, fingerprints, data positions) to
  1. a local folder (the baseline: the same bytes, the same code), and
  2. `gs://` on a local GCS emulator (tests/gcs_emulator.py; a single-threaded
     Python HTTP server on loopback, so this measures the client path and the
     emulator, not Google's service).
Each save is synchronous (timed to committed); each restore reads onto the same
sharding and verifies the fingerprints. Prints a table, writes
benchmarks/results/storage.json. Splash-vs-einsum memory for TPU targets is
benchmarks/attention_memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from gcs_emulator import running_emulator  # noqa: E402

GB = 1e9


def t5_small_state():
    import jax
    from t5x_like.training import optimizers
    from t5x_like.parallel import partitioning
    from t5x_like.training import trainer
    from t5x_like.data import converters
    from t5x_like.models import t5
    config = t5.T5Config(vocab_size=32128, emb_dim=512, num_heads=6, head_dim=64,
                         mlp_dim=1024, num_encoder_layers=8, num_decoder_layers=8,
                         dtype="bfloat16")
    model = t5.EncoderDecoderModel(config=config)
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
    optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
    lengths = converters.model_feature_lengths({"inputs": 512, "targets": 114},
                                               converter="enc_dec", pack=True)
    layout = trainer.state_layout(model=model, optimizer=optimizer, partitioner=partitioner,
                                  feature_lengths=lengths)
    state = trainer.init_train_state(model=model, optimizer=optimizer,
                                     partitioner=partitioner, feature_lengths=lengths,
                                     seed=0, layout=layout)
    return state, layout.abstract_with_shardings()


def round_trips(directory, state, abstract, repeats):
    from t5x_like.checkpointing import checkpoints
    ckpt = checkpoints.Checkpointer(directory=directory, max_to_keep=2, async_save=False)
    ckpt.save(0, state, data_position={"step": 0})         # one-time setup, not measured
    saves, restores = [], []
    try:
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            ckpt.save(step, state, data_position={"step": step},
                      shard_positions={0: b"x" * 1000}, num_data_shards=1)
            ckpt.wait_until_finished()
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.restore(step, abstract_state=abstract)
            restores.append(time.perf_counter() - start)
    finally:
        ckpt.close()
    return saves, restores


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with running_emulator("bench") as url:
        os.environ["STORAGE_EMULATOR_HOST"] = url
        import jax
        state, abstract = t5_small_state()
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        params = sum(x.size for x in jax.tree.leaves(state.params))
        rows = []
        with tempfile.TemporaryDirectory() as local:
            for name, directory in (("local disk", os.path.join(local, "checkpoints")),
                                    ("gs:// (local emulator)", "gs://bench/checkpoints")):
                saves, restores = round_trips(directory, state, abstract, args.repeats)
                rows.append({"target": name, "save_s": statistics.median(saves),
                             "restore_s": statistics.median(restores),
                             "save_gb_per_s": nbytes / GB / statistics.median(saves),
                             "restore_gb_per_s": nbytes / GB / statistics.median(restores),
                             "save_s_all": saves, "restore_s_all": restores})
    local_row = rows[0]
    print(f"T5.1.1-small train state: {params:,} parameters, {nbytes / GB:.3f} GB; "
          f"median of {args.repeats}")
    print(f"{'target':26} {'save s':>8} {'GB/s':>6} {'restore s':>10} {'GB/s':>6} "
          f"{'vs local (save/restore)':>24}")
    for row in rows:
        print(f"{row['target']:26} {row['save_s']:8.2f} {row['save_gb_per_s']:6.3f} "
              f"{row['restore_s']:10.2f} {row['restore_gb_per_s']:6.3f} "
              f"{row['save_s'] / local_row['save_s']:11.1f}x /"
              f"{row['restore_s'] / local_row['restore_s']:6.1f}x")
    os.makedirs(os.path.join(REPO, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(REPO, "benchmarks", "results", "storage.json"), "w") as f:
        json.dump({"parameters": params, "state_bytes": nbytes, "repeats": args.repeats,
                   "rows": rows, "jax": jax.__version__, "cpu_count": os.cpu_count()},
                  f, indent=2)


if __name__ == "__main__":
    main()
