"""Pod fit table: compile T5.1.1 base..xxl and the 1B/7B decoders for TPU slices.

Runs `python -m launch.compile` once per (model, slice) in a subprocess (a fresh
process each, so compile times are not skewed by caches), on this CPU machine with
libtpu installed. Results accumulate in benchmarks/results/aot_fit.json; a rerun
skips entries already there (pass --redo to recompute). Prints a markdown table.

  JAX_PLATFORMS=cpu python benchmarks/aot_fit.py [--only t5_1_1_base] [--timeout 3600]

Setup per run: FSDP over every device of the slice (configs/partitioning/fsdp.gin).
T5.1.1: span corruption 512 -> 114 tokens, Adafactor (T5 recipe), 8 sequences per
device, scanned layers, remat 'save_dots_no_batch'. Decoders: causal LM, 2048 tokens, AdamW (float32 moments), 4 sequences per
device, the gin file's remat policy and scanned layers, XLA attention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot_fit.json")
SLICES = {"v4-32": 16, "v5litepod-16": 16, "v5p-128": 64}     # name -> devices

T5 = dict(flags=["--feature_lengths=inputs=512,targets=114",
                 "--gin.t5.T5Config.scan_layers=True",
                 "--gin.t5.T5Config.remat_policy='save_dots_no_batch'"], per_device=8)
DECODER = dict(flags=["--feature_lengths=targets=2048", "--feature_converter=lm",
                      "--gin_file=decoder_adamw.gin",
                      "--gin.decoder.DecoderConfig.attention_impl='xla'"], per_device=4)
MODELS = {
    "decoder_llama3_2_1b": DECODER, "decoder_llama2_7b": DECODER,
    "t5_1_1_base": T5, "t5_1_1_large": T5, "t5_1_1_xl": T5, "t5_1_1_xxl": T5,
}
ADAMW_GIN = """from __gin__ import dynamic_registration
from t5x_like.training import optimizers
from t5x_like.training import run_config
run_config.RunConfig.optimizer = @optimizers.adamw()
optimizers.adamw.learning_rate = @optimizers.warmup_cosine_schedule()
optimizers.warmup_cosine_schedule:
  peak_learning_rate = 3e-4
  warmup_steps = 2000
  decay_steps = 100000
"""


def run_one(model: str, tpu: str, timeout: int, gin_dir: str) -> dict:
    spec = MODELS[model]
    out = os.path.join(gin_dir, f"{model}_{tpu}.json")
    cmd = [sys.executable, "-m", "launch.compile", f"--topology={tpu}",
           "--gin_file=configs/base.gin", f"--gin_file=configs/models/{model}.gin",
           "--gin_file=configs/partitioning/fsdp.gin", f"--gin_search_paths={gin_dir}",
           f"--batch_size={spec['per_device'] * SLICES[tpu]}", f"--json_out={out}",
           *spec["flags"]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "tpu": tpu, "status": f"compile > {timeout} s"}
    wall = time.perf_counter() - start
    if not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": model, "tpu": tpu, "status": "error", "detail": tail}
    with open(out) as f:
        report = json.load(f)[0]
    return {"model": model, "tpu": tpu, "status": "ok", "wall_seconds": wall, **report}


def table(rows: list[dict]) -> str:
    g = lambda b: f"{b / 2**30:.2f}"
    lines = ["| model | slice | params | global batch | fits | peak GiB/device (HBM) | "
             "params+opt GiB | temporaries GiB | TFLOP/step/device | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['tpu']} | | | ? | {r['status']} | | | | |")
            continue
        hbm = f"{r['hbm_bytes'] / 2**30:.0f}"
        peak = f"{g(r['peak_bytes'])} ({hbm})" if r["peak_bytes"] else f"? ({hbm})"
        fits = "yes" if r["fits"] else "**no**"
        lines.append(
            f"| {r['model']} | {r['tpu']} | {r['num_params'] / 1e9:.2f}B | {r['batch_size']} | "
            f"{fits} | {peak} | {g(r['params_bytes'] + r['opt_state_bytes'])} | "
            f"{g(r['temp_bytes']) if not r['error'] else 'compiler: OOM'} | "
            f"{r['flops_per_device'] / 1e12:.1f} | {r['compile_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", action="append", help="Model name(s) to run.")
    p.add_argument("--slices", action="append", help="Slice name(s) to run.")
    p.add_argument("--timeout", type=int, default=3600, help="Per compile, seconds.")
    p.add_argument("--redo", action="store_true")
    args = p.parse_args()
    done = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
    key = lambda r: (r["model"], r["tpu"])
    have = {key(r): r for r in done}
    with tempfile.TemporaryDirectory() as gin_dir:
        with open(os.path.join(gin_dir, "decoder_adamw.gin"), "w") as f:
            f.write(ADAMW_GIN)
        for model in args.only or MODELS:
            if not os.path.exists(os.path.join(ROOT, "configs", "models", f"{model}.gin")):
                print(f"{model}: no gin file yet, skipped", flush=True)
                continue
            for tpu in args.slices or SLICES:
                if (model, tpu) in have and have[(model, tpu)]["status"] == "ok" \
                        and not args.redo:
                    continue
                row = run_one(model, tpu, args.timeout, gin_dir)
                have[(model, tpu)] = row
                print(table([row]).splitlines()[-1], flush=True)
                os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
                with open(RESULTS, "w") as f:
                    json.dump(sorted(have.values(), key=lambda r: (
                        list(MODELS).index(r["model"]), list(SLICES).index(r["tpu"]))),
                        f, indent=1)
    rows = [have[(m, t)] for m in MODELS for t in SLICES if (m, t) in have]
    print(table(rows))


if __name__ == "__main__":
    main()
