"""The training step on this CPU, as `launch.train` runs it and as the step alone.

    .venv/bin/python -m benchmarks.cpu_step                        # every row, once
    .venv/bin/python -m benchmarks.cpu_step --rows base --log_every 1 10 --repeats 2
    .venv/bin/python -m benchmarks.cpu_step --baseline /tmp/main_checkout --rows 1dev

The run is issue 15's (benchmarks/configs/cpu_step.gin): T5.1.1-small, 76,961,152
parameters, span corruption 512 -> 114 packed over the bundled corpus, batch 8,
Adafactor at a constant 0.01, bf16 activations, no checkpoint writes; plus the CPU
default run (configs/base.gin) as it trains out of the box.

Each row is measured two ways, each in a fresh process (peak RSS is per process),
interleaved run by run:
  launch  the command users run, `python -m launch.train` with the row's gin files,
          one run per `--log_every` value; s/step from the wall times of the
          TensorBoard points it writes, peak RSS from the OS. This is the figure.
  step    the jitted step alone, driven with the run's own parts (gin run config,
          sharded init, `HostBatches`, `partitioning.global_batch`, the state
          donated) and nothing else but the NaN guard's one-step-late read: the
          floor `launch` is held to. A row ending in `_replay` pulls two batches
          from the real pipeline, closes it (its tf.data threads stop) and cycles
          those, so the pipeline's cost is the difference to its row.
The check: on the default run (row `base`), `launch` at log_every_steps=10 must be
within 10% of `step`; the script exits 1 otherwise (after writing its JSON).

s/step is the mean from the first point at or after step 5 to the last step (with
log_every 10: steps 11..N), the time of a step being when the host had its metrics
(one step late, as `train()` reads them). Losses are compared between the two ways
(the launcher logs token-weighted means; at log_every 1 they equal the step's to
float32 rounding). With `--baseline DIR` (a checkout of another commit, e.g. `git
worktree add`) every run also runs against that code, interleaved. Reported per run:
s/step, input + target tokens/s, peak RSS; for `step` also XLA's compiled memory
analysis (arguments, temporaries) and the host memory of the data stack. Prints a
table; writes benchmarks/results/cpu_step.json.
"""

from __future__ import annotations

import argparse
import json
import itertools
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# A CPU benchmark: where libtpu is installed (the test extra brings it for AOT compiles)
# JAX would otherwise initialise its TPU backend first, ~0.1 GiB of RSS in every run
# that a CPU install (`.[data]`, the README's) never holds. Children inherit it.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
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
    'base_replay': ('configs/base.gin', 1, None, True),
}
# Issue 15's goals: (s/step, peak RSS GiB or None) per row.
GOALS = {'1dev': (7.2, 3.5), '8dev_dp': (11.9, None), '8dev_fsdp': (10.0, None)}
FIRST_TIMED_STEP = 6
# The check: `launch` on the default run at most this much slower than `step`.
CHECKED_ROW, CHECKED_LOG_EVERY, MAX_LAUNCH_OVERHEAD = 'base', 10, 0.10


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024


def _gin_files(row: str) -> list[str]:
    gin_file, _, mesh, _ = ROWS[row]
    return [gin_file] + ([f'configs/partitioning/{mesh}.gin'] if mesh else [])


def _window_mean(done_at: dict[int, float], first_step: int) -> tuple[int, float]:
    """(first timed step, mean s/step) from the first point at or after the step
    before `first_step` to the last point; `done_at`: step -> when the host had it."""
    steps = sorted(done_at)
    start = next(s for s in steps if s >= first_step - 1)
    end = steps[-1]
    return start + 1, (done_at[end] - done_at[start]) / (end - start)


def measure_step(row: str, *, steps: int, bindings: list[str]) -> dict:
    """`step` mode, in this process, with whatever `t5x_like` is first on sys.path.

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
    from t5x_like.data import host_batches

    rss_start = _rss_bytes()
    gin_config.parse(gin_files=_gin_files(row), gin_bindings=bindings)   # the data stack
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

    try:                        # as train() does; older checkouts have no such step
        from t5x_like.training.host_memory import release_freed
    except ImportError:
        release_freed = lambda: None
    layout = run.state_layout(partitioner, feature_lengths)
    state = trainer.init_train_state(model=run.model, optimizer=run.optimizer,
                                     partitioner=partitioner, feature_lengths=feature_lengths,
                                     seed=run.seed, layout=layout)
    release_freed()
    jitted = run.jitted_train_step(partitioner, layout, feature_lengths)
    start = time.perf_counter()
    compiled = jitted.lower(state, partitioning.global_batch(first[0], partitioner)
                            ).compile()
    compile_s = time.perf_counter() - start
    release_freed()
    memory = compiled.memory_analysis()

    done_at, step_metrics, previous = {}, [], None
    for step in range(1, steps + 1):
        global_batch = partitioning.global_batch(next(batches), partitioner)
        state, metrics = compiled(state, global_batch)
        if previous is not None:                # the NaN guard's one-step-late read
            float(previous['nonfinite'])
            done_at[step - 1] = time.perf_counter()
        step_metrics.append(metrics)
        previous = metrics
    jax.block_until_ready((state, previous))
    done_at[steps] = time.perf_counter()
    first_timed, mean = _window_mean(done_at, FIRST_TIMED_STEP)
    return {
        'row': row, 'mode': 'step', 'devices': jax.device_count(),
        'batch_size': run.batch_size, 'feature_lengths': feature_lengths,
        'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(layout.abstract.params))),
        'compile_s': compile_s, 'done_at': done_at, 'first_timed_step': first_timed,
        'mean_step_s': mean, 'peak_rss_bytes': _peak_rss_bytes(),
        'data_stack_import_bytes': rss_data_stack - rss_start,
        'pipeline_buffers_bytes': rss_pipeline - rss_data_stack,
        'memory_analysis': {
            'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
            'temporaries': memory.temp_size_in_bytes, 'aliased': memory.alias_size_in_bytes,
            'code': memory.generated_code_size_in_bytes},
        'losses': {step: float(m['loss']) for step, m in enumerate(step_metrics, 1)},
    }


def measure_launch(row: str, *, steps: int, log_every: int, bindings: list[str]) -> dict:
    """`launch` mode: the user's command in a child of this process (so the OS's
    peak RSS of children is its alone), timed by the TensorBoard points it writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, num_devices, _, replay = ROWS[row]
    assert not replay, 'replay rows have no launch mode'
    with tempfile.TemporaryDirectory(prefix='cpu_step_') as model_dir:
        command = [sys.executable, '-m', 'launch.train'] + [
            f'--gin_file={f}' for f in _gin_files(row)] + [
            f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
            f'--gin.train_loop.train.log_every_steps={log_every}',
            f'--gin.train_loop.train.checkpoint_every_steps={10 * steps}'] + [
            f'--gin.{b}' for b in bindings] + (
            [f'--num_cpu_devices={num_devices}'] if num_devices > 1 else [])
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f'error: {" ".join(command)} failed:\n{out.stderr[-3000:]}')
        events = EventAccumulator(os.path.join(model_dir, 'train'))
        events.Reload()
        points = events.Scalars('loss')
    done_at = {p.step: p.wall_time for p in points}
    first_timed, mean = _window_mean(done_at, FIRST_TIMED_STEP)
    return {'row': row, 'mode': 'launch', 'log_every': log_every, 'command': command,
            'done_at': done_at, 'first_timed_step': first_timed, 'mean_step_s': mean,
            'peak_rss_bytes': _peak_rss_bytes(resource.RUSAGE_CHILDREN),
            'losses': {p.step: p.value for p in points}}


def run_child(row: str, *, mode: str, log_every: int, checkout: pathlib.Path, steps: int,
              bindings: list[str], xla_flags: str) -> dict:
    """One measurement in a fresh process on `checkout`'s code, configs and data."""
    env = {**os.environ, 'PYTHONPATH': str(checkout), 'XLA_FLAGS': xla_flags}
    out = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), '--child', row,
         '--mode', mode, '--log_every', str(log_every), '--steps', str(steps)]
        + [f'--gin={b}' for b in bindings],
        cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f'error: row {row} ({mode}) on {checkout} failed — see its '
                         f'output:\n{out.stdout[-3000:]}{out.stderr[-3000:]}')
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ('done_at', 'losses'):          # JSON made the steps strings
        result[key] = {int(k): v for k, v in result[key].items()}
    return result


def summarise(runs: list[dict]) -> dict:
    """Median over repeated runs of one row, way and checkout."""
    def median(key):
        return statistics.median(r[key] for r in runs)
    first = runs[0]
    tokens = first.get('tokens_per_step')
    out = {'mean_step_s': median('mean_step_s'), 'peak_rss_bytes': median('peak_rss_bytes'),
           'runs_step_s': [r['mean_step_s'] for r in runs],
           'first_timed_step': first['first_timed_step'], 'losses': first['losses'],
           'losses_same_every_run': all(r['losses'] == first['losses'] for r in runs)}
    if tokens:
        out['tokens_per_s'] = tokens / out['mean_step_s']
    for key in ('memory_analysis', 'params', 'compile_s', 'data_stack_import_bytes',
                'pipeline_buffers_bytes'):
        if key in first:
            out[key] = first[key] if key in ('memory_analysis', 'params') else median(key)
    return out


def _gib(n: float) -> float:
    return n / 2**30


def _losses_agree(a: dict, b: dict) -> str:
    common = sorted(set(a) & set(b))
    if not common:
        return 'no common steps'
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in common)
    return (f'bitwise equal at {len(common)} steps' if worst == 0
            else f'max rel. difference {worst:.1e} over {len(common)} steps')


def print_table(results: dict) -> None:
    print(f"{'row':<16}{'way':<12}{'code':<10}{'s/step':>8}{'tok/s':>8}{'peak RSS':>10}"
          f"{'args':>8}{'temps':>8}{'runs (s/step)':>22}  vs goal / vs step")
    for row, by_way in results.items():
        step_way = by_way.get('step', {})
        for way, by_code in by_way.items():
            for code, s in by_code.items():
                goal, verdict = GOALS.get(row), ''
                if way == 'step' and goal:
                    verdict = (f"{'met' if s['mean_step_s'] <= goal[0] else 'MISSED'} "
                               f"<= {goal[0]} s")
                    if goal[1]:
                        ok = _gib(s['peak_rss_bytes']) <= goal[1]
                        verdict += f", {'met' if ok else 'MISSED'} <= {goal[1]} GiB"
                if way != 'step' and code in step_way:
                    ratio = s['mean_step_s'] / step_way[code]['mean_step_s']
                    verdict = f"{ratio:.3f}x step"
                    if way == 'launch@1':       # a one-step interval: the step's loss
                        verdict += (f"; losses "
                                    f"{_losses_agree(s['losses'], step_way[code]['losses'])}")
                mem = s.get('memory_analysis')
                args = f"{_gib(mem['arguments']):>6.2f}Gi" if mem else f"{'':>8}"
                temps = f"{_gib(mem['temporaries']):>6.2f}Gi" if mem else f"{'':>8}"
                tok = f"{s['tokens_per_s']:>8.0f}" if 'tokens_per_s' in s else f"{'':>8}"
                runs = ' '.join(f'{x:.2f}' for x in s['runs_step_s'])
                print(f"{row:<16}{way:<12}{code:<10}{s['mean_step_s']:>8.2f}{tok}"
                      f"{_gib(s['peak_rss_bytes']):>8.2f}Gi{args}{temps}{runs:>22}  {verdict}")
            if len(by_code) == 2:
                (_, before), (_, after) = by_code.items()
                print(f"{'':<16}{way:<12}{'speed-up':<10}"
                      f"{before['mean_step_s'] / after['mean_step_s']:>8.2f}x   peak RSS "
                      f"{after['peak_rss_bytes'] / before['peak_rss_bytes']:.2f}x   losses "
                      f"{_losses_agree(after['losses'], before['losses'])}")


def launch_overhead(results: dict) -> float | None:
    """launch / step s/step on the checked row (None if either was not run)."""
    by_way = results.get(CHECKED_ROW, {})
    launch, step = by_way.get(f'launch@{CHECKED_LOG_EVERY}', {}), by_way.get('step', {})
    if 'this' not in launch or 'this' not in step:
        return None
    return launch['this']['mean_step_s'] / step['this']['mean_step_s']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
    parser.add_argument('--ways', nargs='+', default=['launch', 'step'],
                        choices=['launch', 'step'])
    parser.add_argument('--log_every', nargs='+', type=int, default=[10],
                        help="the launcher's log_every_steps (one run each)")
    parser.add_argument('--steps', type=int, default=25)
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--baseline', type=pathlib.Path,
                        help='a checkout of the code to compare against (e.g. main)')
    parser.add_argument('--gin', action='append', default=[],
                        help='an extra gin binding for every run (an experiment)')
    parser.add_argument('--xla_flags', default='', help='XLA_FLAGS for every run (an experiment)')
    parser.add_argument('--out', default=str(RESULTS))
    parser.add_argument('--child', choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument('--mode', choices=['launch', 'step'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.mode == 'launch':
            result = measure_launch(args.child, steps=args.steps, log_every=args.log_every[0],
                                    bindings=args.gin)
        else:
            result = measure_step(args.child, steps=args.steps, bindings=args.gin)
        print(json.dumps(result))
        return
    if args.steps < FIRST_TIMED_STEP + max(args.log_every):
        parser.error(f'--steps must be at least {FIRST_TIMED_STEP} + the largest --log_every')
    checkouts = {'this': ROOT}
    if args.baseline:
        checkouts = {'baseline': args.baseline.resolve(), 'this': ROOT}
    plan = [(row, way, log_every) for row in args.rows for way in args.ways
            for log_every in (args.log_every if way == 'launch' else [0])
            if not (way == 'launch' and ROWS[row][3])]
    runs: dict = {}
    tokens_per_step: dict = {}
    for repeat in range(args.repeats):
        for row, way, log_every in plan:
            name = f'launch@{log_every}' if way == 'launch' else 'step'
            for code, checkout in checkouts.items():
                result = run_child(row, mode=way, log_every=log_every, checkout=checkout,
                                   steps=args.steps, bindings=args.gin,
                                   xla_flags=args.xla_flags)
                if way == 'step':            # input + target tokens of one step
                    tokens_per_step[row] = result['batch_size'] * sum(
                        n for feature, n in result['feature_lengths'].items()
                        if feature in ('encoder_input_tokens', 'decoder_target_tokens'))
                runs.setdefault(row, {}).setdefault(name, {}).setdefault(code, []).append(
                    result)
                print(f'[{repeat + 1}/{args.repeats}] {row:<16}{name:<12}{code:<10}'
                      f'{result["mean_step_s"]:.3f} s/step, peak RSS '
                      f'{_gib(result["peak_rss_bytes"]):.2f} GiB', flush=True)
    for row, by_way in runs.items():         # tokens/s where a step run gave the sizes
        tokens = tokens_per_step.get(row.removesuffix('_replay'), tokens_per_step.get(row))
        for results_ in (r for by_code in by_way.values() for r in by_code.values()):
            for r in results_:
                r['tokens_per_step'] = tokens
    results = {row: {way: {code: summarise(r) for code, r in by_code.items()}
                     for way, by_code in by_way.items()} for row, by_way in runs.items()}
    print_table(results)
    overhead = launch_overhead(results)
    failed = overhead is not None and overhead > 1 + MAX_LAUNCH_OVERHEAD
    out = {'host': platform.node(), 'cpus': os.cpu_count(), 'python': platform.python_version(),
           'steps': args.steps, 'first_timed_step': FIRST_TIMED_STEP,
           'log_every': args.log_every,
           'checkouts': {k: str(v) for k, v in checkouts.items()}, 'gin': args.gin,
           'xla_flags': args.xla_flags, 'launch_overhead': overhead, 'check_failed': failed,
           'results': results, 'runs': runs}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print('wrote', args.out)
    if overhead is None:
        return
    verdict = (f'launch.train on {CHECKED_ROW} (log_every_steps={CHECKED_LOG_EVERY}) runs at '
               f'{overhead:.3f}x the step alone (at most {1 + MAX_LAUNCH_OVERHEAD:.2f}x)')
    if failed:
        raise SystemExit(f'error: {verdict} — the launcher adds work the step does not; '
                         'see benchmarks/RESULTS.md, "The launcher against the step"')
    print(f'check passed: {verdict}')

if __name__ == '__main__':
    main()
