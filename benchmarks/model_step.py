"""Train-step speed and MFU of our models on this machine (CPU, GPU or TPU).

    .venv/bin/python -m benchmarks.model_step                      # CPU, tiny sizes
    python -m benchmarks.model_step --preset gpu                   # H100/H200 sizes
    python -m benchmarks.model_step --model decoder_125m --batch 8 --length 2048 \
        --gin "decoder.DecoderConfig.attention_impl='cudnn'"

Each row builds a model from its gin file (configs/models/*.gin, plus --gin
bindings), initialises it sharded data-parallel over all local devices, and runs
the real jitted train step (AdamW, state donated) on synthetic batches
(t5x_like.data.synthetic; no TensorFlow). It reports compile time, step time,
target tokens/s and MFU against a peak measured here on a large matmul in the
compute dtype (so MFU is "fraction of what this machine's matmul unit delivers").

Model FLOPs per step come from the models themselves
(`model.training_flops_per_step`, see t5x_like/models/flop_count.py: the same count
the training progress line uses). MFU is reported twice: against the matmul peak
measured here (the practical ceiling) and against the device's nominal dense bf16
peak (t5x_like/reporting/device_peaks.py; none on CPU).
Prints a table; writes benchmarks/results/model_step.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_like.reporting import device_peaks
from t5x_like.training import optimizers
from t5x_like.parallel import partitioning
from t5x_like.training import trainer
from t5x_like.data import synthetic
from t5x_like.models import decoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results' / 'model_step.json'

# (gin model, batch, decoder length, encoder length, extra gin bindings)
PRESETS = {
    'cpu': [
        ('decoder_tiny', 8, 128, None, ["decoder.DecoderConfig.scan_layers = False"]),
        ('decoder_tiny', 8, 128, None, ["decoder.DecoderConfig.scan_layers = True",
                                        "decoder.DecoderConfig.remat_policy = 'full'"]),
        ('decoder_tiny', 8, 128, None, ["decoder.DecoderConfig.attention_impl = 'jax_xla'"]),
        ('t5_1_1_tiny', 8, 32, 128, []),
    ],
    'gpu': [
        ('decoder_125m', 16, 2048, None, ["decoder.DecoderConfig.attention_impl = 'xla'"]),
        ('decoder_125m', 16, 2048, None, ["decoder.DecoderConfig.attention_impl = 'cudnn'"]),
        ('decoder_llama3_2_1b', 4, 2048, None, []),
        ('t5_1_1_base', 64, 114, 512, ["t5.T5Config.dtype = 'bfloat16'"]),
    ],
}


def measured_peak_flops(dtype) -> float:
    """Best FLOP/s of a large square matmul in `dtype` on the first device."""
    n = 8192 if jax.default_backend() != 'cpu' else 1024
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float('inf')
    for _ in range(5):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def load_model(name: str, bindings: list[str]):
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(ROOT / 'configs' / 'models' / f'{name}.gin')], bindings)
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
    gin.clear_config()
    return model


def run_row(name, batch, dec_len, enc_len, bindings, *, steps, peaks):
    model = load_model(name, bindings)
    cfg = model.config
    if isinstance(model, decoder.DecoderOnlyModel):
        source = synthetic.SyntheticDecoderSource(decoder_length=dec_len, vocab_size=cfg.vocab_size,
                                                       pack_segments=2)
    else:
        source = synthetic.SyntheticEncDecSource(encoder_length=enc_len, decoder_length=dec_len,
                                                      vocab_size=cfg.vocab_size)
    part = partitioning.Partitioner()
    opt = optimizers.adamw(learning_rate=optax.constant_schedule(1e-4))
    lengths = source.model_feature_lengths()
    flops_per_step = model.training_flops_per_step(feature_lengths=lengths, batch_size=batch)
    layout = trainer.state_layout(model=model, optimizer=opt, partitioner=part, feature_lengths=lengths)
    state = trainer.init_train_state(model=model, optimizer=opt, partitioner=part,
                                     feature_lengths=lengths, seed=0, layout=layout)
    batches = [partitioning.global_batch(source.batch(step=i, shard_index=0, batch_size=batch), part)
               for i in range(2)]
    step = trainer.jit_train_step(trainer.make_train_step(model=model, optimizer=opt),
                                  partitioner=part, layout=layout, batch_feature_names=tuple(batches[0]))
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    dtype = cfg.dtype
    peak = peaks.setdefault(dtype, measured_peak_flops(jnp.dtype(dtype)))
    nominal = device_peaks.peak_bf16_flops(jax.devices()[0].device_kind)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
    variant = ', '.join(b.split('.')[-1].replace(' ', '') for b in bindings) or 'default'
    return {
        'model': name, 'variant': variant, 'params': n_params, 'batch': batch,
        'decoder_length': dec_len, 'encoder_length': enc_len, 'dtype': dtype,
        'compile_s': round(compile_s, 2), 'step_s': step_s,
        'target_tokens_per_s': batch * dec_len / step_s,
        'model_tflops_per_step': flops_per_step / 1e12,
        'peak_tflops_measured': peak / 1e12,
        'mfu': flops_per_step / step_s / jax.device_count() / peak,
        'nominal_peak_tflops': (nominal or 0.0) / 1e12,
        'mfu_vs_nominal_peak': (flops_per_step / step_s / jax.device_count() / nominal
                                if nominal else None),
        'loss': float(metrics['loss']),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', default='cpu' if jax.default_backend() == 'cpu' else 'gpu',
                        choices=sorted(PRESETS))
    parser.add_argument('--model', help='one gin model instead of the preset, e.g. decoder_125m')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--length', type=int, default=512)
    parser.add_argument('--encoder_length', type=int, default=512)
    parser.add_argument('--gin', action='append', default=[], help='extra gin binding')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--out', default=str(RESULTS))
    args = parser.parse_args()
    rows = PRESETS[args.preset]
    if args.model:
        rows = [(args.model, args.batch, args.length,
                 args.encoder_length if args.model.startswith('t5') else None, args.gin)]
    peaks, results = {}, []
    for row in rows:
        results.append(run_row(*row, steps=args.steps, peaks=peaks))
    header = (f"{'model':<22}{'variant':<40}{'params':>12}{'compile s':>10}{'step ms':>10}"
              f"{'tok/s':>11}{'MFU meas.':>10}{'MFU nominal':>12}")
    print(header)
    for r in results:
        print(f"{r['model']:<22}{r['variant'][:39]:<40}{r['params']:>12,}{r['compile_s']:>10.1f}"
              f"{r['step_s'] * 1e3:>10.1f}{r['target_tokens_per_s']:>11,.0f}{r['mfu']:>10.1%}"
              + (f"{r['mfu_vs_nominal_peak']:>12.1%}" if r['mfu_vs_nominal_peak'] else f"{'-':>12}"))
    print('measured matmul peak (TFLOP/s):', {k: round(v / 1e12, 3) for k, v in peaks.items()})
    out = {'host': platform.node(), 'backend': jax.default_backend(),
           'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__, 'rows': results}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    print('wrote', args.out)


if __name__ == '__main__':
    main()
