"""The training step on this CPU: s/step, tokens/s and memory, before vs after.

    .venv/bin/python -m benchmarks.cpu_step                        # every row, once
    .venv/bin/python -m benchmarks.cpu_step --baseline /tmp/main_checkout --repeats 3
    .venv/bin/python -m benchmarks.cpu_step --rows 1dev 1dev_replay --steps 15

The run is issue 15's (benchmarks/configs/cpu_step.gin): T5.1.1-small, 76,961,152
parameters, span corruption 512 -> 114 packed over the bundled corpus, batch 8,
Adafactor at a constant 0.01, bf16 activations, no checkpoint writes; plus the CPU
default run (configs/base.gin) as it trains out of the box.

Each row runs in a fresh process (peak RSS is per process) and drives the run's own
parts the way `train()` does: the run from gin (`run_config.from_gin`), the sharded
init, the data source's `HostBatches`, `partitioning.global_batch`, the jitted step (state
donated), the interval metrics kept on device, and the host reading each step's
`nonfinite` flag one step late, as the NaN guard does. A row ending in `_replay`
pulls two batches from the real pipeline, closes it (its tf.data threads stop) and
cycles those: the step alone, so the pipeline's cost is the difference.

With `--baseline DIR` (a checkout of another commit, e.g. `git worktree add`) every
row also runs against that code, interleaved run by run with this checkout's, and
the table compares the two; losses are compared step by step (bitwise where the
maths did not change). Reported: s/step as the mean over steps 6..N with the clock
synchronised at both ends (per-step times and their median are in the JSON), input
+ target tokens/s, peak RSS, XLA's compiled memory analysis (arguments, outputs,
temporaries) and the host memory of the data stack (its import, then its buffers).
Prints a table; writes benchmarks/results/cpu_step.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results' / 'cpu_step.json'
ISSUE_RUN = str(ROOT / 'benchmarks' / 'configs' / 'cpu_step.gin')

# name -> (gin file, simulated CPU devices, mesh shape gin or None, replay batches)
ROWS = {
    '1dev': (ISSUE_RUN, 1, 'data_parallel', False),
    '1dev_replay': (ISSUE_RUN, 1, 'data_parallel', True),
    '8dev_dp': (ISSUE_RUN, 8, 'data_parallel', False),
    '8dev_dp_replay': (ISSUE_RUN, 8, 'data_parallel', True),
    '8dev_fsdp': (ISSUE_RUN, 8, 'fsdp', False),
    'base': ('configs/base.gin', 1, None, False),
}
# Issue 15's goals: (s/step, peak RSS GiB or None) per row.
GOALS = {'1dev': (7.2, 3.5), '8dev_dp': (11.9, None), '8dev_fsdp': (10.0, None)}
FIRST_TIMED_STEP = 6


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_row(row: str, *, steps: int, bindings: list[str]) -> dict:
    """One row in this process, with whatever `t5x_like` is first on sys.path.

    Uses only interfaces that older commits have too, so `--baseline` can run it
    against them."""
    gin_file, num_devices, mesh, replay = ROWS[row]
    import jax
    jax.config.update('jax_num_cpu_devices', num_devices)
    import numpy as np

    from t5x_like.config import gin_config
    from t5x_like.parallel import partitioning
    from t5x_like.training import run_config
    from t5x_like.training import trainer
    from t5x_like.reporting import metrics as metrics_lib
    from t5x_like.data import host_batches

    rss_start = _rss_bytes()
    files = [gin_file] + ([f'configs/partitioning/{mesh}.gin'] if mesh else [])
    gin_config.parse(gin_files=files, gin_bindings=bindings)      # imports the data stack
    run = run_config.from_gin()
    rss_data_stack = _rss_bytes()
    partitioner = run.partitioner()
    feature_lengths = run.feature_lengths()
    batches = host_batches.HostBatches(
        run.train_data, global_batch_size=run.batch_size, num_data_shards=1,
        process_index=0, process_count=1, start_step=0)
    first = [next(batches) for _ in range(2)]
    rss_pipeline = _rss_bytes()
    if replay:
        del batches                 # the tf.data iterator and its threads go
        import gc
        gc.collect()
        batches = (first[i % 2] for i in range(10**9))
    else:
        batches = itertools.chain(first, batches)   # the first two, then the live pipeline

    layout = run.state_layout(partitioner, feature_lengths)
    state = trainer.init_train_state(model=run.model, optimizer=run.optimizer,
                                     partitioner=partitioner, feature_lengths=feature_lengths,
                                     seed=run.seed, layout=layout)
    jitted = run.jitted_train_step(partitioner, layout, feature_lengths)
    start = time.perf_counter()
    compiled = jitted.lower(state, partitioning.global_batch(first[0], partitioner)
                            ).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    interval = metrics_lib.IntervalMeans()
    tokens_per_step = run.batch_size * sum(
        n for name, n in feature_lengths.items()
        if name in ('encoder_input_tokens', 'decoder_target_tokens'))
    done_at, step_metrics, previous = [], [], None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if step == FIRST_TIMED_STEP:            # warm-up over: everything done, clock on
            jax.block_until_ready((state, previous))
            window_start = time.perf_counter()
        global_batch = partitioning.global_batch(next(batches), partitioner)
        state, metrics = compiled(state, global_batch)
        interval.add(metrics)
        if previous is not None:                # the NaN guard's one-step-late read
            float(previous['nonfinite'])
            done_at.append(time.perf_counter())
        if step % 10 == 0:
            interval.means()
            interval.reset()
        step_metrics.append(metrics)
        previous = metrics
    jax.block_until_ready((state, previous))
    done_at.append(time.perf_counter())
    # Per step: when the host saw each step's metrics (one step late, as train()
    # does). With several CPU devices a dispatch can wait for the step before it, so
    # single intervals pair up (0.2 s + 26 s); the headline is therefore the mean
    # over the window, with the clock synchronised at both ends.
    step_s = np.diff([start] + done_at)
    mean = (done_at[-1] - window_start) / (steps - FIRST_TIMED_STEP + 1)
    peak_rss = _peak_rss_bytes()
    median = float(np.median(step_s[FIRST_TIMED_STEP - 1:]))
    return {
        'row': row, 'gin': gin_file, 'devices': jax.device_count(), 'mesh': mesh,
        'replay': replay, 'batch_size': run.batch_size, 'feature_lengths': feature_lengths,
        'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(layout.abstract.params))),
        'compile_s': compile_s, 'step_s': [float(x) for x in step_s],
        'mean_step_s': mean, 'median_step_s': median, 'tokens_per_s': tokens_per_step / mean,
        'peak_rss_bytes': peak_rss,
        'data_stack_import_bytes': rss_data_stack - rss_start,
        'pipeline_buffers_bytes': rss_pipeline - rss_data_stack,
        'memory_analysis': {
            'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
            'temporaries': memory.temp_size_in_bytes, 'aliased': memory.alias_size_in_bytes,
            'code': memory.generated_code_size_in_bytes},
        'losses': [float(m['loss']).hex() for m in step_metrics],
    }


def run_child(row: str, *, checkout: pathlib.Path, steps: int, bindings: list[str],
              xla_flags: str) -> dict:
    """`measure_row` in a fresh process on `checkout`'s code, configs and data."""
    env = {**os.environ, 'PYTHONPATH': str(checkout)}
    env['XLA_FLAGS'] = xla_flags
    out = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), '--child', row,
         '--steps', str(steps)] + [f'--gin={b}' for b in bindings],
        cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f'error: row {row} on {checkout} failed — see its output:\n'
                         f'{out.stdout[-3000:]}{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Median over repeated runs of one row on one checkout."""
    def median(key):
        return statistics.median(r[key] for r in runs)
    first = runs[0]
    return {'mean_step_s': median('mean_step_s'), 'median_step_s': median('median_step_s'),
            'tokens_per_s': median('tokens_per_s'),
            'peak_rss_bytes': median('peak_rss_bytes'),
            'runs_step_s': [r['mean_step_s'] for r in runs],
            'compile_s': median('compile_s'),
            'data_stack_import_bytes': median('data_stack_import_bytes'),
            'pipeline_buffers_bytes': median('pipeline_buffers_bytes'),
            'memory_analysis': first['memory_analysis'], 'params': first['params'],
            'losses': first['losses'],
            'losses_same_every_run': all(r['losses'] == first['losses'] for r in runs)}


def _gib(n: float) -> float:
    return n / 2**30


def print_table(results: dict) -> None:
    print(f"{'row':<16}{'code':<10}{'s/step':>8}{'tok/s':>8}{'peak RSS':>10}"
          f"{'args':>8}{'temps':>8}{'data MB':>9}{'runs (s/step)':>24}  vs goal")
    for row, by_code in results.items():
        for code, s in by_code.items():
            goal = GOALS.get(row)
            verdict = ''
            if goal:
                verdict = f"{'met' if s['mean_step_s'] <= goal[0] else 'MISSED'} <= {goal[0]} s"
                if goal[1]:
                    ok = _gib(s['peak_rss_bytes']) <= goal[1]
                    verdict += f", {'met' if ok else 'MISSED'} <= {goal[1]} GiB"
            mem = s['memory_analysis']
            data_mb = (s['data_stack_import_bytes'] + s['pipeline_buffers_bytes']) / 2**20
            runs = ' '.join(f'{x:.2f}' for x in s['runs_step_s'])
            print(f"{row:<16}{code:<10}{s['mean_step_s']:>8.2f}{s['tokens_per_s']:>8.0f}"
                  f"{_gib(s['peak_rss_bytes']):>8.2f}Gi{_gib(mem['arguments']):>6.2f}Gi"
                  f"{_gib(mem['temporaries']):>6.2f}Gi{data_mb:>9.0f}{runs:>24}  {verdict}")
        if len(by_code) == 2:
            (_, before), (_, after) = by_code.items()
            same = before['losses'] == after['losses']
            print(f"{'':<16}{'speed-up':<10}{before['mean_step_s'] / after['mean_step_s']:>8.2f}x"
                  f"   peak RSS {after['peak_rss_bytes'] / before['peak_rss_bytes']:.2f}x"
                  f"   losses {'bitwise equal' if same else 'differ'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
    parser.add_argument('--steps', type=int, default=25)
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--baseline', type=pathlib.Path,
                        help='a checkout of the code to compare against (e.g. main)')
    parser.add_argument('--gin', action='append', default=[],
                        help='an extra gin binding for every row (an experiment)')
    parser.add_argument('--xla_flags', default='', help='XLA_FLAGS for every row (an experiment)')
    parser.add_argument('--out', default=str(RESULTS))
    parser.add_argument('--child', choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_row(args.child, steps=args.steps, bindings=args.gin)))
        return
    if args.steps < FIRST_TIMED_STEP:
        parser.error(f'--steps must be at least {FIRST_TIMED_STEP}')
    checkouts = {'this': ROOT}
    if args.baseline:
        checkouts = {'baseline': args.baseline.resolve(), 'this': ROOT}
    runs: dict = {row: {code: [] for code in checkouts} for row in args.rows}
    for repeat in range(args.repeats):
        for row in args.rows:
            for code, checkout in checkouts.items():
                result = run_child(row, checkout=checkout, steps=args.steps, bindings=args.gin,
                                   xla_flags=args.xla_flags)
                runs[row][code].append(result)
                print(f'[{repeat + 1}/{args.repeats}] {row:<16}{code:<10}'
                      f'{result["mean_step_s"]:.2f} s/step, peak RSS '
                      f'{_gib(result["peak_rss_bytes"]):.2f} GiB', flush=True)
    results = {row: {code: summarise(r) for code, r in by_code.items()}
               for row, by_code in runs.items()}
    print_table(results)
    out = {'host': platform.node(), 'cpus': os.cpu_count(), 'python': platform.python_version(),
           'steps': args.steps, 'timed_steps': f'{FIRST_TIMED_STEP}..{args.steps}',
           'checkouts': {k: str(v) for k, v in checkouts.items()}, 'gin': args.gin,
           'xla_flags': args.xla_flags,
           'results': results, 'runs': runs}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print('wrote', args.out)


if __name__ == '__main__':
    main()
