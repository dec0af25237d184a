"""What a restart costs the data pipeline, by step: replaying vs a saved position.

    .venv/bin/python -m benchmarks.resume [--steps 0,1000,2000,5000,10000] [--jsonl_gb 26]

A restarted run must see exactly the batches an uninterrupted run would. Before
(issue 13) the pipeline was rebuilt and replayed: `start_step` batches made and
thrown away. Now each data shard restores the position saved in the checkpoint
(its tf.data iterator state). Measured here, one data shard, batch 32:

1. The bundled span-corruption task (512/114, tokens cached in memory). One
   pipeline is advanced for real to each step in --steps (up to --max_step); its
   position is saved there. For each step: the time from nothing to the first batch
   (build the pipeline, restore, first batch) by replay and from the position, the
   position's size, and whether the next 3 batches are bitwise those of the
   advanced pipeline (and of the replay, where it was run).
2. A user JSONL task larger than this machine's memory (generated under /tmp,
   --jsonl_gb, deleted afterwards; not cached), the same way at smaller steps.
3. Step 1,000,000. No pipeline can be advanced that far here (hours of work), so
   the real-pipeline rows stop at the last of --steps. What changes in a position as
   the step grows is only counters: the epoch count, and the draws of the shuffle
   and span-corruption RNGs (32 each per step); the buffers stay the same size. Part
   3 advances a pipeline made of those stateful stages (epochs repeated, a seed
   stream drawn across epochs, shuffle 1000, batch 32) to step 1,000,000 (32M
   elements, in C++), saves its position and restores it into a fresh pipeline:
   the next batches are those of the advanced pipeline, and the restore time says
   what the counters cost (TensorFlow restores an RNG by skipping its counter).
The replay time at 1,000,000 is extrapolated from the measured replay rate.
Prints tables and writes benchmarks/results/resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data import tasks  # noqa: E402
from t5x_like.data import iterator_state, pipeline, user_tasks  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "resume.json"
BATCH = 32
LENGTHS = {"inputs": 512, "targets": 114}
TARGET_STEP = 1_000_000


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def _open(source, *, step, position=None):
    """Seconds from nothing to the first batch, and the first 3 batches."""
    start = time.perf_counter()
    it = source.iterator(per_host_batch_size=BATCH, shard_index=0, num_shards=1,
                         start_step=step, position=position)
    first = next(it)
    seconds = time.perf_counter() - start
    return seconds, [first, next(it), next(it)]


def pipeline_rows(source, *, steps, replay_steps, label) -> list[dict]:
    """Advances one pipeline through `steps`, saving its position at each."""
    _open(source, step=0)                    # one-time checks, so every row pays the same
    running = source.iterator(per_host_batch_size=BATCH, shard_index=0, num_shards=1,
                              start_step=0)
    rows, advance_start = [], time.perf_counter()
    for step in steps:
        while running.step < step:
            next(running)
        save_start = time.perf_counter()
        position = running.position()
        save_s = time.perf_counter() - save_start
        advanced = [next(running) for _ in range(3)]
        restored_s, restored = _open(source, step=step, position=position)
        row = {"task": label, "step": step, "position_bytes": len(position),
               "save_s": round(save_s, 3), "resume_from_position_s": round(restored_s, 2),
               "next_3_equal_advanced": _same(advanced, restored)}
        if step in replay_steps:
            replay_s, replayed = _open(source, step=step)
            row.update(resume_by_replay_s=round(replay_s, 2),
                       next_3_equal_replay=_same(advanced, replayed))
        rows.append(row)
        print(f"  {label} step {step}: {row}", flush=True)
    rows[-1]["advance_s"] = round(time.perf_counter() - advance_start, 1)
    return rows


def counters_at_target(*, target_step: int) -> dict:
    """The step-dependent parts of a position (RNG draws, epochs) at `target_step`."""
    def build():
        # As in a task: epochs of examples (1000 here) repeated, a per-example seed
        # stream drawn across epochs (seqio's map seeds), a seeded shuffle, batches.
        examples = tf.data.Dataset.range(1_000).repeat()
        seeds = tf.data.Dataset.random(seed=7)
        ds = tf.data.Dataset.zip(examples, seeds)
        return ds.shuffle(1_000, seed=3).batch(BATCH).map(lambda i, seed: i * 7 + seed)

    def position_at(step):
        it = iter(build().skip(step))
        start = time.perf_counter()
        next(it)                                   # runs the skip
        advance_s = time.perf_counter() - start
        return it, iterator_state.save(it), advance_s   # as a shard's position holds it

    out = {}
    for step in (0, target_step):
        it, state, advance_s = position_at(step)
        expected = [next(it).numpy() for _ in range(3)]
        fresh = iter(build().skip(step))        # the same pipeline, not yet advanced
        start = time.perf_counter()
        iterator_state.restore(fresh, state)
        got = [next(fresh).numpy() for _ in range(3)]
        out[step] = {"advance_s": round(advance_s, 1), "position_bytes": len(state),
                     "restore_and_3_batches_s": round(time.perf_counter() - start, 4),
                     "next_3_equal_advanced": all(np.array_equal(a, b)
                                                  for a, b in zip(expected, got))}
        print(f"  counters at step {step}: {out[step]}", flush=True)
    return out


def _write_jsonl(path: pathlib.Path, gigabytes: float) -> int:
    """Distinct JSON lines from the bundled corpus, repeated to `gigabytes`."""
    docs = tasks.SPLIT_FILES["train"].read_text(encoding="utf-8").splitlines()
    block = "".join(json.dumps({"id": i, "text": f"{d} ({i})"}) + "\n"
                    for i, d in enumerate(docs * 20)).encode()
    target = int(gigabytes * 2**30)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            f.write(block)
            written += len(block)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="0,1000,2000,5000,10000")
    parser.add_argument("--replay_steps", default="0,1000,2000",
                        help="Steps at which the replay is also measured.")
    parser.add_argument("--jsonl_steps", default="0,500,1000")
    parser.add_argument("--jsonl_gb", type=float,
                        default=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf(
                            "SC_PAGE_SIZE") / 2**30 * 1.1, 1),
                        help="Size of the generated JSONL file (default: 1.1x RAM).")
    parser.add_argument("--skip_jsonl", action="store_true")
    parser.add_argument("--target_step", type=int, default=TARGET_STEP)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    replay = {int(s) for s in args.replay_steps.split(",")}
    jsonl_steps = [int(s) for s in args.jsonl_steps.split(",")]
    pipeline.configure_tensorflow()

    print("1. bundled span corruption", flush=True)
    bundled = pipeline.SeqioDataSource(mixture_or_task_name="pydocs_span_corruption",
                                       task_feature_lengths=LENGTHS)
    rows = pipeline_rows(bundled, steps=steps, replay_steps=replay, label="pydocs")

    jsonl_gb = None
    if not args.skip_jsonl:
        print(f"2. JSONL task, {args.jsonl_gb} GiB", flush=True)
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            path = pathlib.Path(tmp) / "big.jsonl"
            start = time.perf_counter()
            jsonl_gb = round(_write_jsonl(path, args.jsonl_gb) / 2**30, 1)
            print(f"  wrote {jsonl_gb} GiB in {time.perf_counter() - start:.0f} s",
                  flush=True)
            user_tasks.register_jsonl_task(name="bench_big_jsonl", patterns=str(path),
                                           objective="span_corruption")
            big = pipeline.SeqioDataSource(mixture_or_task_name="bench_big_jsonl",
                                           task_feature_lengths=LENGTHS)
            rows += pipeline_rows(big, steps=jsonl_steps, replay_steps=set(jsonl_steps),
                                  label=f"jsonl {jsonl_gb} GiB")

    target = args.target_step
    print(f"3. position counters at step {target:,}", flush=True)
    counters = counters_at_target(target_step=target)

    summary = {}
    for label in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == label]
        replayed = [r for r in mine if r.get("step") and "resume_by_replay_s" in r]
        at0 = mine[0]["resume_from_position_s"]
        rate = max(r["step"] / (r["resume_by_replay_s"] - mine[0]["resume_by_replay_s"])
                   for r in replayed) if replayed else None
        summary[label] = {
            "resume_at_0_s": at0,
            "max_extra_s_over_step_0": round(max(r["resume_from_position_s"]
                                                 for r in mine) - at0, 2),
            "replay_batches_per_s": round(rate, 1) if rate else None,
            "replay_extrapolated_to_target_s": round(target / rate) if rate else None,
            "max_position_bytes": max(r["position_bytes"] for r in mine),
            "all_next_3_equal": all(r["next_3_equal_advanced"]
                                    and r.get("next_3_equal_replay", True) for r in mine),
        }

    print(f"\n{'task':18s} {'step':>7s} {'replay s':>9s} {'position s':>11s} "
          f"{'position':>10s} {'save s':>7s} {'next 3 equal':>13s}")
    for r in rows:
        replay_s = f"{r['resume_by_replay_s']:9.2f}" if "resume_by_replay_s" in r else \
            f"{'-':>9s}"
        print(f"{r['task']:18s} {r['step']:7d} {replay_s} {r['resume_from_position_s']:11.2f}"
              f" {r['position_bytes']:10,d} {r['save_s']:7.3f} "
              f"{str(r['next_3_equal_advanced'] and r.get('next_3_equal_replay', True)):>13s}")
    for label, s in summary.items():
        print(f"{label}: resume from a position costs at most {s['max_extra_s_over_step_0']} s"
              f" more than at step 0; replay runs {s['replay_batches_per_s']} batches/s, "
              f"i.e. ~{s['replay_extrapolated_to_target_s']} s at step {target:,}")
    c0, c1 = counters[0], counters[target]
    print(f"counters (RNG draws, epochs) at step {target:,}: restore + 3 batches "
          f"{c1['restore_and_3_batches_s']} s vs {c0['restore_and_3_batches_s']} s at step "
          f"0; equal to the advanced pipeline: {c1['next_3_equal_advanced']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "host": f"{platform.node()} ({os.cpu_count()} CPUs visible, shared)",
        "load_average_1m": round(os.getloadavg()[0], 2), "batch": BATCH,
        "target_step": target,
        "lengths": LENGTHS, "jsonl_gib": jsonl_gb, "rows": rows, "summary": summary,
        "counters_at_step": {str(k): v for k, v in counters.items()}}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
