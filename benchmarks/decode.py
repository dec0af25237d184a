"""Decoding speed: our jitted KV-cache loop against Hugging Face `generate`, same weights.

    .venv/bin/python -m benchmarks.decode                    # CPU configs, 5 repeats
    .venv/bin/python -m benchmarks.decode --repeats 9 --new_tokens 128

For each model config (configs/models/decoder_cpu.gin, t5_1_1_cpu.gin) the script
initialises our model (seed 0), exports it with t5x_like.hf to a temporary
safetensors directory and loads that into transformers (LlamaForCausalLM /
T5ForConditionalGeneration, float32, torch on CPU, or CUDA when torch sees a GPU).
Both sides then decode the same batch: greedy, and beam search with 4 beams (our
'hf' rules, HF's length_penalty=1.0), `--new_tokens` tokens per row with EOS
disabled so every row runs to the end. Decoder prompts are `--prompt_length`
tokens, T5 encoder inputs `--encoder_length`; no padding.

Timing: after one warm-up call each (ours compiles there; its time is reported as
`compile_s`), the two sides alternate `--repeats` times and the medians are taken,
so load from other jobs on a shared machine hits both alike. Tokens/s counts output
tokens (batch x new tokens; beams are not counted). `same_tokens` says whether both
produced identical tokens. Prints a table; writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from benchmarks.model_step import load_model
from t5x_like.decoding import decode
from t5x_like.hf import llama as hf_llama
from t5x_like.hf import t5 as hf_t5
from t5x_like.models import decoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "decode.json"


def _init(model, **lengths):
    return nn.unbox(jax.jit(lambda r: model.init_params(r, batch_size=1, **lengths))(
        jax.random.key(0)))


def _setup(name: str, args, directory: str):
    """(our model, params, batch, HF model, HF generate kwargs) for one config."""
    import torch
    import transformers
    model = load_model(name, [])
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    if isinstance(model, decoder.DecoderOnlyModel):
        params = _init(model, decoder_length=8)
        # The export names the context length; ours covers prompt + new tokens.
        hf_llama.export_checkpoint(params, dataclasses.replace(
            model.config, max_position_embeddings=args.prompt_length + args.new_tokens),
            directory)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(directory)
        prompts = rng.integers(3, vocab, (args.batch, args.prompt_length)).astype(np.int32)
        batch = {"decoder_input_tokens": prompts,
                 "decoder_prompt_lengths": np.full(args.batch, args.prompt_length, np.int32)}
        hf_inputs = {"input_ids": torch.from_numpy(prompts.astype(np.int64))}
        skip = args.prompt_length
    else:
        params = _init(model, encoder_length=8, decoder_length=8)
        hf_t5.export_checkpoint(params, model.config, directory)
        hf_model = transformers.T5ForConditionalGeneration.from_pretrained(directory)
        inputs = rng.integers(3, vocab, (args.batch, args.encoder_length)).astype(np.int32)
        batch = {"encoder_input_tokens": inputs}
        hf_inputs = {"input_ids": torch.from_numpy(inputs.astype(np.int64)),
                     "decoder_start_token_id": 0}
        skip = 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model = hf_model.eval().to(device)
    hf_inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in hf_inputs.items()}
    return model, params, batch, hf_model, hf_inputs, skip


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name: str, method: str, args, directory: str) -> dict:
    import torch
    model, params, batch, hf_model, hf_inputs, skip = _setup(name, args, directory)
    beams = 4 if method == "beam" else 1
    no_eos = model.config.vocab_size + 1    # never produced: every row runs to the end
    config = decode.DecodeConfig(max_decode_length=args.new_tokens, eos_id=no_eos,
                                   num_beams=beams, length_penalty="hf", alpha=1.0)

    def ours():
        result = decode.predict_batch(model, params, batch, config=config)
        return np.asarray(jax.block_until_ready(result.tokens_BxL))

    def theirs():
        with torch.no_grad():
            out = hf_model.generate(**hf_inputs, max_new_tokens=args.new_tokens,
                                    do_sample=False, num_beams=beams, length_penalty=1.0,
                                    early_stopping=False, eos_token_id=no_eos, pad_token_id=0)
        return out[:, skip:].cpu().numpy()

    compile_s, our_tokens = _time(ours)
    _, hf_tokens = _time(theirs)
    our_times, hf_times = [], []
    for _ in range(args.repeats):           # interleaved: shared-machine load hits both
        our_times.append(_time(ours)[0])
        hf_times.append(_time(theirs)[0])
    tokens = args.batch * args.new_tokens
    ours_s, hf_s = float(np.median(our_times)), float(np.median(hf_times))
    return {"model": name, "method": f"beam{beams}" if beams > 1 else "greedy",
            "batch": args.batch, "new_tokens": args.new_tokens,
            "prompt_or_encoder_length": skip if skip > 1 else args.encoder_length,
            "compile_s": round(compile_s - ours_s, 2),
            "ours_s": ours_s, "hf_s": hf_s,
            "ours_tokens_per_s": tokens / ours_s, "hf_tokens_per_s": tokens / hf_s,
            "speedup_vs_hf": hf_s / ours_s,
            "same_tokens": bool(np.array_equal(our_tokens, hf_tokens)),
            "ours_times_s": our_times, "hf_times_s": hf_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["decoder_cpu", "t5_1_1_cpu"])
    parser.add_argument("--methods", nargs="+", default=["greedy", "beam"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--encoder_length", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for method in args.methods:
                rows.append(bench(name, method, args, f"{tmp}/{name}"))
                r = rows[-1]
                print(f"{r['model']:<12} {r['method']:<7} ours {r['ours_tokens_per_s']:>9,.0f} "
                      f"tok/s  HF {r['hf_tokens_per_s']:>9,.0f} tok/s  x{r['speedup_vs_hf']:.2f}"
                      f"  same tokens: {r['same_tokens']}  (compile {r['compile_s']} s)",
                      flush=True)
    print("\n| model | method | batch x new tokens | ours tok/s | HF tok/s | ours / HF "
          "| same tokens | our compile s |\n|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['batch']} x {r['new_tokens']} | "
              f"{r['ours_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} | "
              f"{r['speedup_vs_hf']:.2f} | {'yes' if r['same_tokens'] else 'no'} | "
              f"{r['compile_s']} |")
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "jax": jax.__version__, "jax_backend": jax.default_backend(),
               "devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "hf_device": "cuda" if torch.cuda.is_available() else "cpu"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
