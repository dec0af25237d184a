"""Data pipeline throughput on this host: ours vs a plain seqio tokenize+trim floor.

    .venv/bin/python -m benchmarks.data_pipeline [--seconds 20]

Measures, in one run on the same data (the bundled pydocs train split, repeated):
  span_512_114   full span corruption pipeline (tokenize, corrupt, pack, batch),
                 SeqioDataSource 'enc_dec', {'inputs': 512, 'targets': 114}
  lm_2048        causal LM pipeline (tokenize, concatenate+split, pack, batch), 'lm'
  ... , before   the same without the in-memory cache of tokenized documents
                 (`cache_tokenized_in_memory`, on for the bundled tasks)
  ... , N threads the same with SeqioDataSource.threads = N (default 2)
  floor_512      plain seqio: TextLineDataSource -> seqio.preprocessors.tokenize ->
                 trim to 512 (Task.get_dataset), no objective, no packing, no batching
and reports sequences/s and real (non-padding) tokens/s after a warm-up. The floor is
what any seqio pipeline pays for TF + SentencePiece on this host. Also: how many hosts
like this one feed one H100 training T5.1.1-base (~1,000 sequences/s of 512/114).
Prints a table and writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402

from data import tasks  # noqa: E402
from t5x_like.data import pipeline, user_tasks  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "data_pipeline.json"
H100_T5_BASE_SEQ_PER_S = 1000  # T5.1.1-base at 512/114 on one H100 (estimate, not measured)


def _time(iterator, *, seconds: float, warmup: int, count) -> dict:
    for _ in range(warmup):
        next(iterator)
    n_seq = n_tok = n_items = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        item = next(iterator)
        seqs, toks = count(item)
        n_seq, n_tok, n_items = n_seq + seqs, n_tok + toks, n_items + 1
    elapsed = time.perf_counter() - start
    return {"seconds": round(elapsed, 2), "items": n_items,
            "sequences_per_s": round(n_seq / elapsed, 1),
            "tokens_per_s": round(n_tok / elapsed)}


def _batch_counter(token_keys):
    def count(batch):
        first = batch[token_keys[0]]
        return first.shape[0], int(sum(np.count_nonzero(batch[k]) for k in token_keys))
    return count


def ours(*, task, lengths, converter, batch_size, seconds, pack=True, threads=2):
    source = pipeline.SeqioDataSource(
        mixture_or_task_name=task, task_feature_lengths=lengths,
        feature_converter=converter, pack=pack, threads=threads)
    keys = (("encoder_input_tokens", "decoder_target_tokens") if converter == "enc_dec"
            else ("decoder_target_tokens",))
    t0 = time.perf_counter()
    it = source.iterator(per_host_batch_size=batch_size, shard_index=0, num_shards=1,
                         start_step=0)
    next(it)
    startup = time.perf_counter() - t0
    out = _time(it, seconds=seconds, warmup=3, count=_batch_counter(keys))
    return {**out, "startup_s": round(startup, 2),
            "lengths": dict(lengths), "batch_size": batch_size, "pack": pack,
            "threads": threads}


def floor(*, length, seconds):
    name = "bench_floor_tokenize_trim"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource(
            {"train": str(tasks.SPLIT_FILES["train"])}),
        preprocessors=[
            lambda ds: ds.map(lambda line: {"targets": line}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={"targets": seqio.Feature(tasks.pydocs_vocabulary(),
                                                  add_eos=True)},
        metric_fns=[])
    pipeline.configure_tensorflow()
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"targets": length}, split="train", shuffle=False, num_epochs=None)
    it = ds.as_numpy_iterator()
    out = _time(it, seconds=seconds, warmup=50,
                count=lambda ex: (1, int(np.count_nonzero(ex["targets"]))))
    return {**out, "lengths": {"targets": length}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()

    # "Before": the same tasks without the in-memory cache of tokenized documents.
    patterns = {split: str(path) for split, path in tasks.SPLIT_FILES.items()}
    for objective in ("span_corruption", "lm"):
        user_tasks.register_text_task(name=f"bench_{objective}_uncached", patterns=patterns,
                                      objective=objective,
                                      vocabulary=tasks.pydocs_vocabulary())
    span = dict(lengths={"inputs": 512, "targets": 114}, converter="enc_dec",
                batch_size=args.batch_size, seconds=args.seconds)
    lm = dict(lengths={"targets": 2048}, converter="lm",
              batch_size=max(args.batch_size // 4, 1), seconds=args.seconds)
    rows = {
        "floor_512 (seqio tokenize+trim)": floor(length=512, seconds=args.seconds),
        "span_512_114 packed, before": ours(task="bench_span_corruption_uncached", **span),
        "span_512_114 packed": ours(task="pydocs_span_corruption", **span),
        "span_512_114 packed, 8 threads": ours(task="pydocs_span_corruption", threads=8,
                                               **span),
        "span_512_114 packed, before, 8 threads": ours(
            task="bench_span_corruption_uncached", threads=8, **span),
        "span_512_114 unpacked": ours(task="pydocs_span_corruption", pack=False, **span),
        "lm_2048 packed, before": ours(task="bench_lm_uncached", **lm),
        "lm_2048 packed": ours(task="pydocs_lm", **lm),
    }
    floor_tok = rows["floor_512 (seqio tokenize+trim)"]["tokens_per_s"]
    for row in rows.values():
        row["tokens_vs_floor"] = round(row["tokens_per_s"] / floor_tok, 2)
    hosts = {name: int(np.ceil(H100_T5_BASE_SEQ_PER_S / rows[name]["sequences_per_s"]))
             for name in rows if name.startswith("span_512_114 packed")}
    summary = {
        "host": f"{platform.node()} ({os.cpu_count()} CPUs visible, shared)",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "h100_t5_base_seq_per_s": H100_T5_BASE_SEQ_PER_S,
        "hosts_like_this_per_h100": hosts,
    }
    print(f"{'pipeline':34s} {'seq/s':>9s} {'tokens/s':>10s} {'vs floor':>9s}")
    for name, row in rows.items():
        print(f"{name:34s} {row['sequences_per_s']:9.1f} {row['tokens_per_s']:10d} "
              f"{row['tokens_vs_floor']:9.2f}")
    print(f"hosts like this one to feed one H100 training T5.1.1-base "
          f"(~{H100_T5_BASE_SEQ_PER_S} seq/s of 512/114): {hosts}"
          f"  (load average {summary['load_average_1m']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
